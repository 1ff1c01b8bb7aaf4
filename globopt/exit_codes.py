"""Exit codes of every globopt command, shared by the CLI and rank 0 of an MPI launch.

A batch script decides what to do from these alone: 2 means the input needs fixing before a retry, 130
means the run was interrupted and ``globopt resume`` continues it, 1 is an internal error.
"""

EXIT_OK = 0
EXIT_ERROR = 1  # an internal error (a bug or a failing environment); the traceback says where
EXIT_USAGE = 2  # something the user must fix: the config, the run directory, the model
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM: committed results are kept, resume continues the run
