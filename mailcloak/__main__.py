from mailcloak.daemon import main

raise SystemExit(main())
