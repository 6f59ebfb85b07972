"""`python -m llmpress ...` runs the command line (also under torchrun)."""
import sys

from llmpress.cli import main

sys.exit(main())
