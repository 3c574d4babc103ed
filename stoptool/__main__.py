"""`python -m stoptool ...` (and `torchrun ... -m stoptool pretrain ...`)."""

from stoptool.cli import main

if __name__ == "__main__":
    main()
