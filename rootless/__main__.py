from rootless.cli.main import main

raise SystemExit(main())
