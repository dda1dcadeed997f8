from rmib.cli import main

main()
