from pdmp_cli.cli import main

main()
