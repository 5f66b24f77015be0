#!/usr/bin/env bash
# The main job on built-in defaults: train (cached) the demo NestedUNet on the bundled real nuclei image,
# export FP32 + INT8, validate against PyTorch, deploy to this machine, profile both, print the tables.
# Extra arguments go to 'edgeseg quickstart' (e.g. --frames 100 --out /tmp/qs).
# shellcheck source=scripts/_env.sh
source "$(dirname "$0")/_env.sh"
exec edgeseg quickstart "$@"
