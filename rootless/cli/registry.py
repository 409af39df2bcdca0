"""The registry flags (`--tls-verify`, `--cert-dir`, `--authfile`, `--platform`, `--creds`, `--pull`) and the
login/logout commands: argparse stays in the CLI, the registry modules take RegistryOptions."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from rootless.cli.flags import attached_flag
from rootless.errors import RbuildError

if TYPE_CHECKING:  # the client API (oci, digests, dataclasses) only when a registry is used, not to parse flags
    from rootless.registry.api import RegistryOptions

_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False, "on": True, "off": False}


def _add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    attached_flag(
        parser,
        "--tls-verify",
        True,
        _BOOLS,
        None,
        "--tls-verify[=BOOL]: require HTTPS and verify certificates (default: true, except on loopback"
        " and for registries.conf insecure registries)",
    )
    parser.add_argument("--cert-dir", metavar="DIR", help="use certificates (*.crt, *.cert, *.key) in DIR")
    parser.add_argument(
        "--authfile",
        metavar="FILE",
        help="credentials file (default: $REGISTRY_AUTH_FILE or ${XDG_RUNTIME_DIR:-~/.config}/containers/auth.json)",
    )


def add_registry_arguments(parser: argparse.ArgumentParser) -> None:
    """--tls-verify[=BOOL], --cert-dir, --authfile, --platform, --creds USER[:PASS]."""
    _add_tls_arguments(parser)
    parser.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="platform to pull (default: the host's)")
    parser.add_argument("--creds", metavar="USER[:PASS]", help="credentials for the registry")


def add_pull_argument(parser: argparse.ArgumentParser) -> None:
    """--pull[=always|missing|never|newer] (and podman's =true/=false); a bare --pull means always, as in
    docker, and never takes the next word as its value."""
    policies: dict[str, object] = {p: p for p in ("always", "missing", "never", "newer")}
    policies.update({"true": "always", "false": "missing"})
    attached_flag(
        parser,
        "--pull",
        "always",
        policies,
        "missing",
        "--pull[=POLICY]: always, missing (default), never or newer; a bare --pull is always",
    )


def options_from_args(args: argparse.Namespace) -> RegistryOptions:
    """RegistryOptions from parsed arguments (any of them may be absent)."""
    from rootless.registry.api import RegistryOptions

    return RegistryOptions(
        tls_verify=getattr(args, "tls_verify", None),
        cert_dir=getattr(args, "cert_dir", None),
        authfile=getattr(args, "authfile", None),
        platform=getattr(args, "platform", None),
        creds=getattr(args, "creds", None),
    )


def add_login_arguments(parser: argparse.ArgumentParser) -> None:
    """`rbuild login [-u USER] [-p PASS | --password-stdin] HOST`."""
    parser.add_argument("registry", metavar="HOST", help="registry to log into (HOST[:PORT])")
    parser.add_argument("-u", "--username", help="user name (asked for on a terminal when missing)")
    parser.add_argument("-p", "--password", help="password (prefer --password-stdin)")
    parser.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    _add_tls_arguments(parser)


def add_logout_arguments(parser: argparse.ArgumentParser) -> None:
    """`rbuild logout [--all] [HOST]`."""
    parser.add_argument("registry", metavar="HOST", nargs="?", help="registry to log out of")
    parser.add_argument("-a", "--all", action="store_true", help="remove every saved login")
    parser.add_argument("--authfile", metavar="FILE", help="credentials file")


def login_command(args: argparse.Namespace) -> str:
    """Run `rbuild login`: ask for what is missing (on a terminal only), verify, save; the line to show."""
    if args.password and args.password_stdin:
        raise RbuildError("--password and --password-stdin are mutually exclusive")
    username = args.username
    if not username:
        if not sys.stdin.isatty():
            raise RbuildError("login: no --username given and no terminal to ask")
        username = input("Username: ").strip()
    if args.password_stdin:
        password = sys.stdin.read().rstrip("\r\n")
    elif args.password:
        password = args.password
    elif sys.stdin.isatty():
        import getpass

        password = getpass.getpass("Password: ")
    else:
        raise RbuildError("login: no password given (use --password-stdin)")
    from rootless.registry.api import login

    login(args.registry, username, password, options_from_args(args))
    return "Login Succeeded!"


def logout_command(args: argparse.Namespace) -> str:
    """Run `rbuild logout HOST` or `rbuild logout --all`; the line to show."""
    from rootless.registry.api import login_host, logout

    options = options_from_args(args)
    if args.all:
        from rootless.registry import auth

        auth.erase_all_credentials(options.authfile)
        return "Removed login credentials for all registries"
    if not args.registry:
        raise RbuildError("logout: give a registry or --all")
    logout(args.registry, options)
    return f"Removed login credentials for {login_host(args.registry)}"
