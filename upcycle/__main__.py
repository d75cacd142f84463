from upcycle.cli import main

main()
