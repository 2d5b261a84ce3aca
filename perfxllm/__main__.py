import sys

from perfxllm.cli import main

sys.exit(main())
