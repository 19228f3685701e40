from safe_scheduler.cli import main

main()
