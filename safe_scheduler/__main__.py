from safe_scheduler.entry import scheduler

scheduler()
