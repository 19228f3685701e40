from safe_scheduler.entry import main

main("scheduler")
