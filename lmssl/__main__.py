from lmssl.cli import main

raise SystemExit(main())
