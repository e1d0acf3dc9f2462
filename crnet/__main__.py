"""`python -m crnet ...` runs the command line; torchrun takes the same form: `torchrun -m crnet train`."""

from crnet.commands.entry import main

if __name__ == "__main__":
    main()
