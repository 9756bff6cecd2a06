"""The `deploy` subcommand's arguments (kept beside the CLI so the deploy stage stays free of argparse)."""


def add_deploy_parser(sub) -> None:
    return None
