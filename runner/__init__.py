"""prefect-vm-runner: claim one Prefect flow run, run it in-process, report, tear the VM down."""

__version__ = "0.1.0"
