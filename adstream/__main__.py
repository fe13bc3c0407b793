from adstream.cli import main

raise SystemExit(main())
