#!/usr/bin/env python3
"""Train the demo NestedUNet on the bundled nuclei image (a few minutes on two CPU cores).

    python scripts/train_demo.py --out /tmp/demo-model

writes model.pth (a plain state_dict), config.yml (pytorch-nested-unet format) and train.json
(held-out IoU on the right quarter of the image, steps, seconds, seed, torch version).
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write model.pth, config.yml, "
                        "train.json into (created if missing)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: the demo recipe's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print the training report as JSON")
    args = parser.parse_args(argv)
    from edgeseg.host.errors import EdgesegError
    from edgeseg.host.train import train_demo

    try:
        report = train_demo(out_dir=args.out, steps=args.steps, seed=args.seed)
    except EdgesegError as exc:
        print("error: {}".format(exc.message), file=sys.stderr)
        if exc.hint:
            print("hint: {}".format(exc.hint), file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("held-out IoU {:.3f} after {} steps ({:.0f} s): {}".format(
            report["heldout_iou"], report["steps"], report["seconds"], report["out_dir"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
