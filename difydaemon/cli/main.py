"""
The ``dify`` console script: tools for plugin authors (``runtimes.md`` §6).

``main(argv, stdin, stdout, stderr)`` parses the command line, runs one
command and returns its exit status.  A user error is one line on stderr
(``dify: error: ...``) and a non-zero status, never a traceback.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

from difydaemon.cli.console import Console
from difydaemon.cli.errors import CommandError

DEFAULT_KEY_NAME = "dify_plugin_signing_key"
USAGE_ERROR = 2
_READ_LIMIT = 12 * 50 * 1024 * 1024


class _Exit(Exception):
    """argparse wants to end the program (``--help``, usage errors)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that writes to the run's console and never calls sys.exit."""

    def __init__(self, *args, console: Console, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.console = console

    def _print_message(self, message, file=None) -> None:
        if message:
            stream = self.console.stderr if file is sys.stderr else self.console.stdout
            stream.write(message)

    def exit(self, status=0, message=None):
        if message:
            self.console.stderr.write(message)
        raise _Exit(status)

    def error(self, message):
        raise CommandError(f"{self.prog}: {message} (see --help)", USAGE_ERROR)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("difydaemon")
    except metadata.PackageNotFoundError:
        return "0.1.0"


# -- commands ----------------------------------------------------------------


def _cmd_version(args, console: Console) -> int:
    console.out(_version())
    return 0


def _permissions(args):
    from difydaemon.cli.scaffold import Permissions

    return Permissions(
        endpoint=args.allow_endpoint,
        tool=args.allow_tool,
        model=args.allow_model,
        llm=args.allow_llm,
        text_embedding=args.allow_text_embedding,
        rerank=args.allow_rerank,
        tts=args.allow_tts,
        speech2text=args.allow_speech2text,
        moderation=args.allow_moderation,
        node=args.allow_node,
        app=args.allow_app,
        storage=args.allow_storage or args.storage_size is not None,
        storage_size=args.storage_size if args.storage_size is not None else 1048576,
    )


_PERMISSION_WORDS = ("endpoint", "tool", "model", "llm", "text_embedding", "rerank", "tts", "speech2text",
                     "moderation", "node", "app", "storage")


def _ask_missing(args, console: Console) -> None:
    """Fill missing init values from prompts (only on a terminal, never with --quick)."""
    from difydaemon.cli.scaffold import CATEGORIES

    if args.name is None:
        args.name = console.ask("Plugin name (a-z, 0-9, _ and -)")
    if args.author is None:
        args.author = console.ask("Author (a-z, 0-9, _ and -)")
    if args.description is None:
        args.description = console.ask("Description", "A Dify plugin")
    if args.category is None:
        args.category = console.ask(f"Category ({', '.join(CATEGORIES)})", "tool")
    if args.repo is None:
        args.repo = console.ask("Repository URL (optional)") or None
    if not any(getattr(args, f"allow_{word}") for word in _PERMISSION_WORDS):
        answer = console.ask(f"Permissions, comma-separated ({', '.join(_PERMISSION_WORDS)}; empty for none)")
        for word in (part.strip().replace("-", "_") for part in answer.split(",")):
            if not word:
                continue
            if word not in _PERMISSION_WORDS:
                raise CommandError(f"unknown permission {word!r}")
            setattr(args, f"allow_{word}", True)


def _cmd_plugin_init(args, console: Console) -> int:
    from difydaemon.cli.scaffold import ScaffoldOptions, write_scaffold

    missing = [flag for flag, value in (("--name", args.name), ("--author", args.author)) if value is None]
    if missing and not args.quick and console.is_interactive():
        _ask_missing(args, console)
    elif missing:
        how = "with --quick, " if args.quick else "stdin is not a terminal, so "
        raise CommandError(f"{how}{' and '.join(missing)} must be given")
    options = ScaffoldOptions(
        author=args.author,
        name=args.name,
        description=args.description if args.description is not None else "A Dify plugin",
        category=args.category or "tool",
        repo=args.repo or None,
        language=args.language,
        min_dify_version=args.min_dify_version,
        permissions=_permissions(args),
    )
    directory = write_scaffold(args.output, options, datetime.datetime.now().astimezone())
    console.progress(f"created the {options.category} plugin {options.author}/{options.name}")
    console.out(directory)
    return 0


def _max_size(args) -> int:
    from difydaemon.cli.packing import MEGABYTE

    if args.max_size <= 0:
        raise CommandError(f"invalid --max-size {args.max_size}: it must be a positive number of MB")
    return int(args.max_size * MEGABYTE)


def _cmd_plugin_package(args, console: Console) -> int:
    from difydaemon.cli.packing import find_uv_or_none, package_directory

    directory = args.directory
    data, decoded = package_directory(directory, _max_size(args), find_uv_or_none(), _offline(args, console))
    output = args.output or os.path.basename(os.path.abspath(directory).rstrip(os.sep)) + ".difypkg"
    _write_file(output, data)
    console.progress(f"wrote {output} ({len(data)} bytes)")
    console.out(decoded.identifier.raw)
    return 0


def _offline(args, console: Console):
    """For ``--offline``: what adds the wheels of the target platforms to the files; else None."""
    if not args.offline:
        return None
    from difydaemon.cli.offline import DEFAULT_PLATFORMS, with_wheels

    platforms = tuple(args.platform) or DEFAULT_PLATFORMS

    def add_wheels(files):
        console.progress(f"downloading wheels for Python {args.python_version} on {', '.join(platforms)}")
        return with_wheels(files, platforms, args.python_version)

    return add_wheels


def _write_file(path: str, data: bytes, mode: int = 0o644) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    except OSError as error:
        raise CommandError(f"cannot write {path}: {error.strerror}") from None


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise CommandError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise CommandError(f"{what} is a directory: {path}") from None
    except OSError as error:
        raise CommandError(f"cannot read {what} {path}: {error.strerror}") from None


def _read_zip(path: str):
    from difydaemon.errors import DaemonError
    from difydaemon.packaging.archive import read_package

    data = _read_file(path, "package")
    try:
        return data, read_package(data, _READ_LIMIT)
    except DaemonError as error:
        raise CommandError(f"{path}: {error.message}") from None


def _cmd_plugin_checksum(args, console: Console) -> int:
    from difydaemon.cli.packing import find_uv_or_none, plugin_files
    from difydaemon.packaging.checksum import directory_checksum, package_checksum

    target = args.target
    if os.path.isdir(target):
        files = plugin_files(target, find_uv_or_none())
        console.out(directory_checksum(files.items()))
        return 0
    _, files = _read_zip(target)
    console.out(package_checksum(files))
    return 0


def _cmd_plugin_run(args, console: Console) -> int:
    from difydaemon.cli.run import run_command

    return run_command(console, args.target, args.response_format, args.enable_logs)


def _cmd_signature_generate(args, console: Console) -> int:
    from difydaemon.packaging.signature import generate_key_pair

    if args.bits < 1024:
        raise CommandError("--bits must be at least 1024")
    private_path = f"{args.filename}.private.pem"
    public_path = f"{args.filename}.public.pem"
    for path in (private_path, public_path):
        if os.path.exists(path):
            raise CommandError(f"{path} already exists; not overwriting a key")
    private_pem, public_pem = generate_key_pair(args.bits)
    _write_file(private_path, private_pem, 0o600)
    _write_file(public_path, public_pem)
    console.out(private_path)
    console.out(public_path)
    return 0


def _signed_path(path: str) -> str:
    directory, base = os.path.split(path)
    stem = base[: -len(".difypkg")] if base.endswith(".difypkg") else base
    return os.path.join(directory, f"{stem}.signed.difypkg")


def _cmd_signature_sign(args, console: Console) -> int:
    from difydaemon.errors import DaemonError
    from difydaemon.packaging.signature import sign_package

    data = _read_file(args.package, "package")
    key = _read_file(args.private_key, "private key")
    try:
        signed = sign_package(data, key, args.authorized_category, int(time.time()))
    except ValueError as error:
        raise CommandError(f"cannot sign with {args.private_key}: {error}") from None
    except DaemonError as error:
        raise CommandError(f"{args.package}: {error.message}") from None
    output = _signed_path(args.package)
    _write_file(output, signed)
    console.out(output)
    return 0


def _cmd_signature_verify(args, console: Console) -> int:
    from difydaemon.packaging.signature import load_public_key, official_public_key, verify_package

    if args.public_key:
        pem = _read_file(args.public_key, "public key")
        try:
            keys = [load_public_key(pem)]
        except ValueError as error:
            raise CommandError(f"bad public key {args.public_key}: {error}") from None
    else:
        keys = [official_public_key()]
    _, files = _read_zip(args.package)
    verification = verify_package(files, keys)
    if verification is None:
        raise CommandError(f"{args.package}: signature verification failed")
    console.out(f"verified: authorized_category={verification.authorized_category}")
    return 0


def _cmd_bundle_init(args, console: Console) -> int:
    from difydaemon.cli.bundle import init_bundle

    missing = [flag for flag, value in (("--name", args.name), ("--author", args.author)) if value is None]
    if missing and console.is_interactive():
        args.name = args.name or console.ask("Bundle name (a-z, 0-9, _ and -)")
        args.author = args.author or console.ask("Author")
        if args.description is None:
            args.description = console.ask("Description", "")
    elif missing:
        raise CommandError(f"{' and '.join(missing)} must be given")
    console.out(init_bundle(args.output, args.name, args.author, args.description or ""))
    return 0


def _cmd_bundle_add_package(args, console: Console) -> int:
    from difydaemon.cli.bundle import add_package

    console.out(add_package(args.bundle, args.package))
    return 0


def _cmd_bundle_add_github(args, console: Console) -> int:
    from difydaemon.cli.bundle import add_dependency

    add_dependency(args.bundle, {"type": "github", "value": {"repo_pattern": args.repo_pattern}})
    console.out(args.repo_pattern)
    return 0


def _cmd_bundle_add_marketplace(args, console: Console) -> int:
    from difydaemon.cli.bundle import add_dependency

    add_dependency(args.bundle, {"type": "marketplace", "value": {"marketplace_pattern": args.marketplace_pattern}})
    console.out(args.marketplace_pattern)
    return 0


def _cmd_bundle_package(args, console: Console) -> int:
    from difydaemon.cli.bundle import package_bundle

    data, dependencies = package_bundle(args.bundle)
    output = args.output or os.path.basename(os.path.abspath(args.bundle).rstrip(os.sep)) + ".difybndl"
    _write_file(output, data)
    console.progress(f"{len(dependencies)} dependencies")
    console.out(output)
    return 0


# -- the parser --------------------------------------------------------------


def build_parser(console: Console) -> argparse.ArgumentParser:
    """The ``dify`` argument parser, writing to ``console``."""
    from difydaemon.cli.scaffold import CATEGORIES, LANGUAGES

    parser = _Parser(prog="dify", description="Tools for Dify plugin authors.", console=console)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def add(group, name, help_text, handler):
        sub = group.add_parser(name, help=help_text, description=help_text, console=console)
        sub.set_defaults(handler=handler)
        return sub

    add(commands, "version", "print the version", _cmd_version)

    plugin = commands.add_parser("plugin", help="create, package, check and run plugins",
                                 description="create, package, check and run plugins", console=console)
    plugin_commands = plugin.add_subparsers(dest="plugin_command", metavar="COMMAND", parser_class=_Parser)
    plugin_commands.required = True

    init = add(plugin_commands, "init", "create a new plugin directory", _cmd_plugin_init)
    init.add_argument("--author", help="author (a-z, 0-9, _ and -)")
    init.add_argument("--name", help="plugin name (a-z, 0-9, _ and -); also the directory name")
    init.add_argument("--description", help="one-line description")
    init.add_argument("--repo", help="repository URL")
    init.add_argument("--category", choices=CATEGORIES, help="what the plugin provides (default: tool)")
    init.add_argument("--language", choices=LANGUAGES, default="python", help="runner language")
    init.add_argument("--min-dify-version", help="meta.minimum_dify_version")
    for word in _PERMISSION_WORDS:
        init.add_argument(f"--allow-{word.replace('_', '-')}", action="store_true",
                          help=f"ask for the {word.replace('_', ' ')} permission")
    init.add_argument("--storage-size", type=int, help="storage quota in bytes (implies --allow-storage)")
    init.add_argument("--quick", action="store_true", help="never prompt; missing values are errors or defaults")
    init.add_argument("-o", "--output", default=".", help="parent directory of the new plugin (default: .)")

    package = add(plugin_commands, "package", "build a .difypkg from a plugin directory", _cmd_plugin_package)
    package.add_argument("directory", help="the plugin directory")
    package.add_argument("-o", "--output", "--output_path", dest="output",
                         help="the package file (default: <directory name>.difypkg)")
    package.add_argument("--max-size", type=float, default=50, help="maximum uncompressed size in MB (default: 50)")
    package.add_argument("--offline", action="store_true",
                         help="put the wheels of the requirements in the package (wheels/), for installs with no index")
    package.add_argument("--platform", action="append", default=[],
                         help="a target platform tag for --offline (repeatable; default: manylinux2014_x86_64 and _aarch64)")
    package.add_argument("--python-version", default="3.12", help="the target Python for --offline (default: 3.12)")

    checksum = add(plugin_commands, "checksum", "print the checksum of a package or plugin directory",
                   _cmd_plugin_checksum)
    checksum.add_argument("target", help="a .difypkg file or a plugin directory")

    run = add(plugin_commands, "run", "run a plugin locally, answering JSON requests from stdin", _cmd_plugin_run)
    run.add_argument("target", help="a plugin directory or .difypkg file")
    run.add_argument("-r", "--response-format", choices=("json", "text"), default="json",
                     help="output format (default: json)")
    run.add_argument("-l", "--enable-logs", action="store_true", help="print the plugin's logs as info lines")

    signature = commands.add_parser("signature", help="sign and verify packages",
                                    description="sign and verify packages", console=console)
    signature_commands = signature.add_subparsers(dest="signature_command", metavar="COMMAND", parser_class=_Parser)
    signature_commands.required = True

    generate = add(signature_commands, "generate", "create an RSA key pair (PKCS#1 PEM)", _cmd_signature_generate)
    generate.add_argument("-f", "--filename", default=DEFAULT_KEY_NAME,
                          help=f"writes NAME.private.pem and NAME.public.pem (default: {DEFAULT_KEY_NAME})")
    generate.add_argument("--bits", type=int, default=4096, help=argparse.SUPPRESS)

    sign = add(signature_commands, "sign", "sign a package; writes <name>.signed.difypkg", _cmd_signature_sign)
    sign.add_argument("package", help="the .difypkg to sign")
    sign.add_argument("-p", "--private-key", "--private_key", dest="private_key", required=True,
                      help="the private key PEM")
    sign.add_argument("-c", "--authorized-category", "--authorized_category", dest="authorized_category",
                      choices=("langgenius", "partner", "community"), default="langgenius",
                      help="the category written into the package (default: langgenius)")

    verify = add(signature_commands, "verify", "verify a package's signature (exit 0 if verified)",
                 _cmd_signature_verify)
    verify.add_argument("package", help="the .difypkg to verify")
    verify.add_argument("-p", "--public-key", "--public_key", dest="public_key",
                        help="a public key PEM (default: the official langgenius key)")

    bundle = commands.add_parser("bundle", help="create and package plugin bundles",
                                 description="create and package plugin bundles", console=console)
    bundle_commands = bundle.add_subparsers(dest="bundle_command", metavar="COMMAND", parser_class=_Parser)
    bundle_commands.required = True

    bundle_init = add(bundle_commands, "init", "create a new bundle directory", _cmd_bundle_init)
    bundle_init.add_argument("--name", help="bundle name (a-z, 0-9, _ and -)")
    bundle_init.add_argument("--author", help="author")
    bundle_init.add_argument("--description", help="one-line description")
    bundle_init.add_argument("-o", "--output", default=".", help="parent directory (default: .)")

    bundle_add = bundle_commands.add_parser("add", help="add a dependency to a bundle",
                                            description="add a dependency to a bundle", console=console)
    add_commands = bundle_add.add_subparsers(dest="add_command", metavar="KIND", parser_class=_Parser)
    add_commands.required = True
    add_package = add(add_commands, "package", "embed a .difypkg in the bundle", _cmd_bundle_add_package)
    add_package.add_argument("bundle", help="the bundle directory")
    add_package.add_argument("-p", "--package", "--package_path", dest="package", required=True,
                             help="the .difypkg")
    add_github = add(add_commands, "github", "depend on a GitHub release asset", _cmd_bundle_add_github)
    add_github.add_argument("bundle", help="the bundle directory")
    add_github.add_argument("-r", "--repo-pattern", "--repo_pattern", dest="repo_pattern", required=True,
                            help="org/repo:version/asset")
    add_marketplace = add(add_commands, "marketplace", "depend on a marketplace plugin",
                          _cmd_bundle_add_marketplace)
    add_marketplace.add_argument("bundle", help="the bundle directory")
    add_marketplace.add_argument("-m", "--marketplace-pattern", "--marketplace_pattern",
                                 dest="marketplace_pattern", required=True, help="org/plugin:version")

    bundle_package = add(bundle_commands, "package", "build a .difybndl from a bundle directory",
                         _cmd_bundle_package)
    bundle_package.add_argument("bundle", help="the bundle directory")
    bundle_package.add_argument("-o", "--output", "--output_path", dest="output",
                                help="the bundle file (default: <directory name>.difybndl)")
    return parser


def main(argv=None, stdin=None, stdout=None, stderr=None) -> int:
    """
    Run one ``dify`` command.

    :param argv: the arguments after the program name (default: ``sys.argv[1:]``).
    :param stdin, stdout, stderr: the streams (default: the process's).
    :returns: the exit status.
    """
    console = Console(stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr)
    arguments = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(console).parse_args(arguments)
        return args.handler(args, console)
    except _Exit as stop:
        return stop.status
    except CommandError as error:
        console.error(error.message)
        return error.exit_code
    except KeyboardInterrupt:
        console.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
