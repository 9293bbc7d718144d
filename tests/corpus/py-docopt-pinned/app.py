"""Naval Fate, docopt's own example, as a function: the event carries the command line.

Usage:
  naval_fate ship new <name>...
  naval_fate ship <name> move <x> <y> [--speed=<kn>]
  naval_fate mine (set|remove) <x> <y> [--moored | --drifting]
  naval_fate -h | --help

Options:
  -h --help     Show this screen.
  --speed=<kn>  Speed in knots [default: 10].
  --moored      Moored (anchored) mine.
  --drifting    Drifting mine.
"""
from docopt import DocoptExit, docopt


def lambda_handler(event, context):
    try:
        return {"ok": True, "arguments": docopt(__doc__, argv=event["argv"], help=False)}
    except DocoptExit as exc:
        return {"ok": False, "usage": str(exc).strip().splitlines()[0]}
