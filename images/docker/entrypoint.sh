#!/bin/sh
# ENTRYPOINT of the runner's container image: `python -m runner` with the container's
# arguments, unless the arguments are a command of their own.
#
#   IMAGE --flow-run-id ID        python -m runner --flow-run-id ID
#   IMAGE  (no arguments)         python -m runner   (flow run id from PREFECT__FLOW_RUN_ID)
#   IMAGE doctor | bundle | env   python -m runner doctor | ...
#   IMAGE python -m runner ...    as given: what a Docker, ECS or Kubernetes work pool runs
#                                 when its `command` is `python -m runner` (it replaces CMD,
#                                 not ENTRYPOINT), and what `--image` runs for a flow stage
#   IMAGE sh                      as given
set -e
case "${1-}" in
    "" | -* | run | bundle | env | doctor | worker-stage) exec python -m runner "$@" ;;
esac
exec "$@"
