from natctl.cli import main

main()
