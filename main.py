"""fimaq command line: ``python main.py {fit,validate,calibrate,...} -c CONFIG``."""

from fimaq.cli import main

if __name__ == "__main__":
    main()
