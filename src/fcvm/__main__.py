from fcvm.cli.main import main

raise SystemExit(main())
