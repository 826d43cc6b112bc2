"""python -m imagenet_ddp.bench {shards,loaders,gpu,predict,models,soak,serve,stage} [options]"""

import importlib
import sys

BENCHES = ("shards", "loaders", "gpu", "predict", "models", "soak", "serve", "stage")

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        print(f"usage: python -m imagenet_ddp.bench {{{','.join(BENCHES)}}} [options]", file=sys.stderr)
        sys.exit(2)
    sys.argv[0] = f"python -m imagenet_ddp.bench {sys.argv[1]}"  # argparse's name for the command
    from imagenet_ddp.errors import UserError

    try:
        sys.exit(importlib.import_module(f"imagenet_ddp.bench.{sys.argv[1]}").main(sys.argv[2:]))
    except UserError as e:
        print(f"{sys.argv[0]}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        print(f"{sys.argv[0]}: unexpected error while benchmarking (traceback below)", file=sys.stderr)
        raise
