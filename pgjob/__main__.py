from .cli import main

main(prog_name="pgjob")  # `python -m pgjob` completes and helps as `pgjob`
