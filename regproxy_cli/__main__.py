from regproxy_cli.cli.app import main

main()
