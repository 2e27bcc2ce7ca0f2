import sys

from onpolicy_sft.cli import main

sys.exit(main())
