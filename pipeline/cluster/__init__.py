"""Where independent jobs run: in this process, or as Ray tasks when `RAY_ADDRESS` is set (see `jobs`)."""

from pipeline.cluster.jobs import Job, Local, board_resource, connect

__all__ = ["Job", "Local", "board_resource", "connect"]
