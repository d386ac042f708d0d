from fc_agent.main import main

raise SystemExit(main())
