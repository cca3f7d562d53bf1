from msn.cli import main

raise SystemExit(main())
