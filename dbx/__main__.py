"""``python -m dbx``: the ``dbx`` command, so that ``torchrun -m dbx run spec.yaml`` works."""
from dbx.cli import main

if __name__ == "__main__":
    main(prog_name="dbx")
