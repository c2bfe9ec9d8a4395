from pgpcl.cli import main

raise SystemExit(main())
