"""Tests for the ``dify`` commands, run in-process through ``main(argv)``."""

from __future__ import annotations

import io
import os
import zipfile

import yaml

from difydaemon.cli.main import main
from difydaemon.cli.scaffold import CATEGORIES
from difydaemon.packaging.archive import read_package
from difydaemon.packaging.package import PackagePolicy, decode_bundle, decode_package
from difydaemon.packaging.signature import load_public_key, official_public_key, verify_package
from difydaemon.testing.cases import SynchronousTestCase
from tests.cli.helpers import (
    AGENT,
    ALL_FIXTURES,
    TerminalInput,
    dify,
    read,
    write,
)

POLICY = PackagePolicy(max_size=52428800, force_verify=False, enforce_langgenius=False,
                       public_keys=(official_public_key(),))


class OneLineErrorMixin:
    """Assertions on failed commands."""

    def assertOneLineError(self, outcome, *fragments):
        """The command failed with exactly one ``dify: error:`` line naming ``fragments``."""
        self.assertNotEqual(outcome.status, 0)
        lines = outcome.stderr.splitlines()
        self.assertEqual(len(lines), 1, outcome.stderr)
        self.assertTrue(lines[0].startswith("dify: error: "), lines[0])
        self.assertNotIn("Traceback", outcome.stderr)
        for fragment in fragments:
            self.assertIn(fragment, lines[0])


class HelpAndVersionTests(OneLineErrorMixin, SynchronousTestCase):
    """Every command has --help; usage errors are one line."""

    COMMANDS = (
        (), ("version",), ("plugin",), ("plugin", "init"), ("plugin", "package"), ("plugin", "checksum"),
        ("plugin", "run"), ("signature",), ("signature", "generate"), ("signature", "sign"),
        ("signature", "verify"), ("bundle",), ("bundle", "init"), ("bundle", "add"),
        ("bundle", "add", "package"), ("bundle", "add", "github"), ("bundle", "add", "marketplace"),
        ("bundle", "package"),
    )

    def test_help_everywhere(self):
        """--help on every command prints its usage on stdout and exits 0."""
        for command in self.COMMANDS:
            outcome = dify(*command, "--help")
            self.assertEqual(outcome.status, 0, command)
            self.assertTrue(outcome.stdout.startswith("usage: dify"), command)
            self.assertEqual(outcome.stderr, "")

    def test_bits_hidden(self):
        """The test-only --bits option does not show in the help."""
        self.assertNotIn("--bits", dify("signature", "generate", "--help").stdout)

    def test_version(self):
        """dify version prints a version number."""
        outcome = dify("version")
        self.assertEqual(outcome.status, 0)
        self.assertRegex(outcome.stdout.strip(), r"^\d+\.\d+\.\d+")

    def test_usage_errors(self):
        """An unknown command or a missing argument is one line and exit status 2."""
        for argv in (("plugin", "nope"), ("plugin", "package"), (), ("signature", "sign", "x.difypkg")):
            outcome = dify(*argv)
            self.assertOneLineError(outcome)
            self.assertEqual(outcome.status, 2)


class InitTests(OneLineErrorMixin, SynchronousTestCase):
    """dify plugin init."""

    def setUp(self):
        super().setUp()
        self.parent = self.mktemp()
        os.makedirs(self.parent)

    def init(self, *extra, name="echoer", category="tool"):
        return dify("plugin", "init", "--quick", "--author", "acme", "--name", name, "--category", category,
                    "-o", self.parent, *extra)

    def manifest(self, name="echoer"):
        return yaml.safe_load(read(os.path.join(self.parent, name, "manifest.yaml")))

    def test_tool_layout(self):
        """A tool scaffold has every file the SDK and the packager expect."""
        outcome = self.init()
        self.assertEqual(outcome.status, 0, outcome.stderr)
        directory = os.path.join(self.parent, "echoer")
        self.assertEqual(outcome.stdout.strip(), directory)
        for path in ("manifest.yaml", "main.py", "requirements.txt", "README.md", "PRIVACY.md", ".difyignore",
                     ".gitignore", ".env.example", "_assets/icon.svg", "_assets/icon-dark.svg",
                     "provider/echoer.yaml", "provider/echoer.py", "tools/echoer.yaml", "tools/echoer.py"):
            self.assertTrue(os.path.isfile(os.path.join(directory, path)), path)
        self.assertEqual(read(os.path.join(directory, "requirements.txt")), b"dify_plugin>=0.10.0,<0.11.0\n")
        env = read(os.path.join(directory, ".env.example")).decode()
        self.assertIn("INSTALL_METHOD=remote\n", env)
        self.assertIn("REMOTE_INSTALL_URL=localhost:5003\n", env)
        self.assertIn("REMOTE_INSTALL_KEY=", env)

    def test_manifest_fields(self):
        """The manifest has version 0.0.1, python 3.12/main, both icons, 256 MiB, both arches, a zoned created_at."""
        self.init("--description", "Says things back", "--repo", "https://example.com/acme/echoer",
                  "--min-dify-version", "1.9.0")
        manifest = self.manifest()
        self.assertEqual(manifest["version"], "0.0.1")
        self.assertEqual((manifest["author"], manifest["name"], manifest["type"]), ("acme", "echoer", "plugin"))
        self.assertEqual(manifest["description"], {"en_US": "Says things back"})
        self.assertEqual((manifest["icon"], manifest["icon_dark"]), ("icon.svg", "icon-dark.svg"))
        self.assertEqual(manifest["resource"]["memory"], 268435456)
        self.assertEqual(manifest["meta"]["runner"], {"language": "python", "version": "3.12", "entrypoint": "main"})
        self.assertEqual(manifest["meta"]["arch"], ["amd64", "arm64"])
        self.assertEqual(manifest["meta"]["minimum_dify_version"], "1.9.0")
        self.assertEqual(manifest["repo"], "https://example.com/acme/echoer")
        self.assertEqual(manifest["plugins"], {"tools": ["provider/echoer.yaml"]})
        self.assertRegex(manifest["created_at"], r"T\d\d:\d\d:\d\d([+-]\d\d:\d\d|Z)$")

    def test_permissions_from_flags(self):
        """The --allow-* flags and --storage-size become resource.permission."""
        self.init("--allow-tool", "--allow-llm", "--allow-rerank", "--allow-endpoint", "--allow-node",
                  "--allow-app", "--storage-size", "4096")
        permission = self.manifest()["resource"]["permission"]
        self.assertEqual(permission["tool"], {"enabled": True})
        self.assertEqual(permission["model"], {"enabled": True, "llm": True, "text_embedding": False,
                                               "rerank": True, "tts": False, "speech2text": False,
                                               "moderation": False})
        self.assertEqual(permission["endpoint"], {"enabled": True})
        self.assertEqual(permission["node"], {"enabled": True})
        self.assertEqual(permission["app"], {"enabled": True})
        self.assertEqual(permission["storage"], {"enabled": True, "size": 4096})

    def test_no_permissions(self):
        """Without flags the plugin asks for nothing."""
        self.init()
        self.assertEqual(self.manifest()["resource"]["permission"], {})

    def test_every_category_is_accepted_by_the_daemon(self):
        """Each category's scaffold packages and decodes with the daemon's checks, with the right provider kind."""
        kinds = {"tool": "tool", "extension": "endpoint", "agent-strategy": "agent_strategy",
                 "datasource": "datasource", "trigger": "trigger"}
        for category in CATEGORIES:
            name = f"p-{category}"
            self.assertEqual(self.init(name=name, category=category).status, 0, category)
            output = os.path.join(self.parent, f"{name}.difypkg")
            outcome = dify("plugin", "package", os.path.join(self.parent, name), "-o", output)
            self.assertEqual(outcome.status, 0, f"{category}: {outcome.stderr}")
            declaration = decode_package(read(output), POLICY).declaration
            kind = kinds.get(category, "model")
            self.assertIn(kind, declaration, category)
            if kind == "model":
                [model] = declaration["model"]["models"]
                self.assertEqual(model["model_type"], category)

    def test_extension_enables_endpoints(self):
        """An extension plugin gets the endpoint permission without asking."""
        self.init(name="hook", category="extension")
        self.assertEqual(self.manifest("hook")["resource"]["permission"], {"endpoint": {"enabled": True}})

    def test_quick_requires_name_and_author(self):
        """--quick without --name is one error line."""
        outcome = dify("plugin", "init", "--quick", "--author", "acme", "-o", self.parent)
        self.assertOneLineError(outcome, "--name")

    def test_no_terminal_no_prompts(self):
        """Without a terminal and without --name the command fails instead of prompting."""
        outcome = dify("plugin", "init", "--author", "acme", "-o", self.parent, stdin=io.StringIO("x\n"))
        self.assertOneLineError(outcome, "--name")

    def test_interactive(self):
        """On a terminal, missing values are asked for, one per line."""
        answers = TerminalInput("asked\nbob\nAsked plugin\nllm\n\nstorage, tool\n")
        outcome = dify("plugin", "init", "-o", self.parent, stdin=answers)
        self.assertEqual(outcome.status, 0, outcome.stderr)
        manifest = self.manifest("asked")
        self.assertEqual(manifest["author"], "bob")
        self.assertEqual(manifest["description"], {"en_US": "Asked plugin"})
        self.assertEqual(manifest["plugins"], {"models": ["provider/asked.yaml"]})
        self.assertEqual(manifest["resource"]["permission"]["storage"]["enabled"], True)
        self.assertEqual(manifest["resource"]["permission"]["tool"], {"enabled": True})

    def test_bad_values(self):
        """Bad names, authors and repos are one error line each."""
        for extra, fragment in ((("--name", "Bad Name"), "--name"), (("--author", "UPPER"), "--author"),
                                (("--repo", "not a url"), "--repo"),
                                (("--allow-storage", "--storage-size", "10"), "--storage-size")):
            argv = {"--name": "ok", "--author": "acme"}
            rest = list(extra)
            if extra[0] in argv:
                argv[extra[0]] = extra[1]
                rest = []
            outcome = dify("plugin", "init", "--quick", "-o", self.parent,
                           *[item for pair in argv.items() for item in pair], *rest)
            self.assertOneLineError(outcome, fragment)

    def test_existing_directory(self):
        """A non-empty target directory is refused."""
        self.init()
        self.assertOneLineError(self.init(), "already exists")


class PackageTests(OneLineErrorMixin, SynchronousTestCase):
    """dify plugin package and dify plugin checksum on directories."""

    def setUp(self):
        super().setUp()
        self.parent = os.path.abspath(self.mktemp())
        os.makedirs(self.parent)
        outcome = dify("plugin", "init", "--quick", "--author", "acme", "--name", "echoer", "-o", self.parent)
        self.assertEqual(outcome.status, 0)
        self.directory = os.path.join(self.parent, "echoer")
        self.output = os.path.join(self.parent, "out.difypkg")

    def package(self, *extra):
        return dify("plugin", "package", self.directory, "-o", self.output, *extra)

    def names(self):
        with zipfile.ZipFile(self.output) as archive:
            return archive.namelist(), archive.infolist()

    def test_scaffold_packages_and_decodes(self):
        """The scaffolded tool plugin packages; the daemon decodes it with its tool and the printed identifier."""
        outcome = self.package()
        self.assertEqual(outcome.status, 0, outcome.stderr)
        decoded = decode_package(read(self.output), POLICY)
        self.assertEqual(outcome.stdout.strip(), decoded.identifier.raw)
        self.assertEqual(decoded.identifier.plugin_id, "acme/echoer")
        tool = decoded.declaration["tool"]
        self.assertEqual(tool["identity"]["name"], "echoer")
        self.assertEqual([t["identity"]["name"] for t in tool["tools"]], ["echoer"])

    def test_zip_layout(self):
        """Entries are sorted, deflated, without directory entries, and .env/.git are left out."""
        write(os.path.join(self.directory, ".env"), "REMOTE_INSTALL_KEY=secret\n")
        write(os.path.join(self.directory, ".git", "HEAD"), "ref: refs/heads/main\n")
        write(os.path.join(self.directory, "__pycache__", "x.pyc"), b"\0")
        self.assertEqual(self.package().status, 0)
        names, infos = self.names()
        self.assertEqual(names, sorted(names, key=lambda name: name.encode()))
        self.assertFalse([name for name in names if name.endswith("/")])
        self.assertTrue(all(info.compress_type == zipfile.ZIP_DEFLATED for info in infos))
        for left_out in (".env", ".git/HEAD", "__pycache__/x.pyc"):
            self.assertNotIn(left_out, names)
        self.assertIn("_assets/icon.svg", names)

    def test_difyignore_rules(self):
        """.difyignore globs, directories, comments and negations decide what goes in."""
        write(os.path.join(self.directory, ".difyignore"),
              "# scratch files\n*.log\n!keep.log\nscratch/\n/top-only.txt\n")
        for path in ("a.log", "keep.log", "scratch/x.py", "top-only.txt", "sub/top-only.txt", "sub/b.log"):
            write(os.path.join(self.directory, path), "x")
        self.assertEqual(self.package().status, 0)
        names, _ = self.names()
        self.assertIn("keep.log", names)
        self.assertIn("sub/top-only.txt", names)
        for left_out in ("a.log", "scratch/x.py", "top-only.txt", "sub/b.log"):
            self.assertNotIn(left_out, names)

    def test_gitignore_when_no_difyignore(self):
        """Without .difyignore the .gitignore rules apply."""
        os.remove(os.path.join(self.directory, ".difyignore"))
        write(os.path.join(self.directory, ".gitignore"), "notes.txt\n")
        write(os.path.join(self.directory, "notes.txt"), "x")
        self.assertEqual(self.package().status, 0)
        self.assertNotIn("notes.txt", self.names()[0])

    def test_directory_checksum_matches_package(self):
        """dify plugin checksum on the directory prints the packaged identifier's checksum."""
        identifier = self.package().stdout.strip()
        outcome = dify("plugin", "checksum", self.directory)
        self.assertEqual(outcome.status, 0)
        self.assertEqual(outcome.stdout.strip(), identifier.rsplit("@", 1)[1])
        self.assertEqual(dify("plugin", "checksum", self.output).stdout, outcome.stdout)

    def test_default_output_name(self):
        """Without -o the package is <directory name>.difypkg in the current directory."""
        cwd = os.getcwd()
        os.chdir(self.parent)
        self.addCleanup(os.chdir, cwd)
        self.assertEqual(dify("plugin", "package", "echoer").status, 0)
        self.assertTrue(os.path.isfile(os.path.join(self.parent, "echoer.difypkg")))

    def test_oversize(self):
        """Over --max-size, the one error line gives the total and the five largest files."""
        for index in range(7):
            write(os.path.join(self.directory, f"data/blob{index}.bin"), os.urandom(300000 + index * 1000))
        outcome = self.package("--max-size", "1")
        self.assertOneLineError(outcome, "too large", "data/blob6.bin", "data/blob2.bin")
        self.assertNotIn("data/blob1.bin", outcome.stderr)
        self.assertFalse(os.path.exists(self.output))

    def test_missing_directory(self):
        """A directory that does not exist is one error line."""
        outcome = dify("plugin", "package", os.path.join(self.parent, "nope"), "-o", self.output)
        self.assertOneLineError(outcome, "not found")

    def test_bad_manifest(self):
        """A manifest the daemon refuses is one error line naming the field."""
        path = os.path.join(self.directory, "manifest.yaml")
        manifest = yaml.safe_load(read(path))
        manifest["version"] = "1.0"
        write(path, yaml.safe_dump(manifest))
        self.assertOneLineError(self.package(), "daemon would refuse", "version")

    def test_missing_icon(self):
        """An icon missing from _assets is refused, as the daemon refuses it."""
        os.remove(os.path.join(self.directory, "_assets", "icon-dark.svg"))
        self.assertOneLineError(self.package(), "icon-dark.svg")

    def test_unparsable_yaml(self):
        """A provider YAML that does not parse is one error line."""
        write(os.path.join(self.directory, "tools", "echoer.yaml"), "identity: [unclosed\n")
        self.assertOneLineError(self.package(), "tools/echoer.yaml")


class ChecksumTests(OneLineErrorMixin, SynchronousTestCase):
    """dify plugin checksum on packages."""

    def test_fixtures(self):
        """The checksum of each real package is the one in the daemon's identifier."""
        for path in ALL_FIXTURES:
            outcome = dify("plugin", "checksum", path)
            self.assertEqual(outcome.status, 0)
            decoded = decode_package(read(path), POLICY)
            self.assertEqual(outcome.stdout.strip(), decoded.identifier.checksum, path)

    def test_not_a_zip(self):
        """A file that is not a zip is one error line."""
        path = self.mktemp()
        write(path, "hello")
        self.assertOneLineError(dify("plugin", "checksum", path), "not a valid difypkg")

    def test_missing(self):
        """A missing path is one error line."""
        self.assertOneLineError(dify("plugin", "checksum", self.mktemp()), "not found")


def tampered(data: bytes, name: str) -> bytes:
    """The same zip, entry order and comment kept, with one byte of ``name`` changed."""
    source = zipfile.ZipFile(io.BytesIO(data))
    output = io.BytesIO()
    with zipfile.ZipFile(output, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for info in source.infolist():
            content = source.read(info)
            if info.filename == name:
                content = bytes([content[0] ^ 0x01]) + content[1:]
            archive.writestr(info, content)
        archive.comment = source.comment
    return output.getvalue()


class SignatureTests(OneLineErrorMixin, SynchronousTestCase):
    """dify signature generate, sign and verify."""

    def setUp(self):
        super().setUp()
        self.directory = self.mktemp()
        os.makedirs(self.directory)

    def test_verify_official(self):
        """The official agent package verifies against the official key."""
        outcome = dify("signature", "verify", AGENT)
        self.assertEqual(outcome.status, 0, outcome.stderr)
        self.assertIn("langgenius", outcome.stdout)

    def test_verify_tampered(self):
        """Changing one byte of one file makes verification fail with exit 1."""
        path = os.path.join(self.directory, "agent.difypkg")
        write(path, tampered(read(AGENT), "main.py"))
        self.assertEqual(read_package(read(path), 52428800).comment, read_package(read(AGENT), 52428800).comment)
        outcome = dify("signature", "verify", path)
        self.assertEqual(outcome.status, 1)
        self.assertOneLineError(outcome, "verification failed")

    def test_verify_unsigned(self):
        """An unsigned package does not verify."""
        self.assertEqual(dify("signature", "verify", ALL_FIXTURES[2]).status, 1)

    def generate(self):
        prefix = os.path.join(self.directory, "key")
        outcome = dify("signature", "generate", "-f", prefix, "--bits", "2048")
        self.assertEqual(outcome.status, 0, outcome.stderr)
        self.assertEqual(outcome.lines, [prefix + ".private.pem", prefix + ".public.pem"])
        return prefix + ".private.pem", prefix + ".public.pem"

    def test_generate_pkcs1(self):
        """Generated keys are PKCS#1 PEM; the private one is readable by its owner only."""
        private, public = self.generate()
        self.assertTrue(read(private).startswith(b"-----BEGIN RSA PRIVATE KEY-----"))
        self.assertTrue(read(public).startswith(b"-----BEGIN RSA PUBLIC KEY-----"))
        self.assertEqual(os.stat(private).st_mode & 0o777, 0o600)
        load_public_key(read(public))

    def test_generate_refuses_overwrite(self):
        """An existing key file is not overwritten."""
        self.generate()
        outcome = dify("signature", "generate", "-f", os.path.join(self.directory, "key"), "--bits", "2048")
        self.assertOneLineError(outcome, "already exists")

    def test_sign_and_verify(self):
        """A package signed by dify signature sign verifies with verify_package given the public key."""
        private, public = self.generate()
        package = os.path.join(self.directory, "plugin.difypkg")
        write(package, read(ALL_FIXTURES[2]))
        outcome = dify("signature", "sign", package, "-p", private, "-c", "partner")
        self.assertEqual(outcome.status, 0, outcome.stderr)
        signed = os.path.join(self.directory, "plugin.signed.difypkg")
        self.assertEqual(outcome.stdout.strip(), signed)
        files = read_package(read(signed), 52428800)
        verification = verify_package(files, [official_public_key(), load_public_key(read(public))])
        self.assertEqual(verification.authorized_category, "partner")
        self.assertIsNone(verify_package(files, [official_public_key()]))
        third_party = PackagePolicy(max_size=52428800, force_verify=True, enforce_langgenius=False,
                                    public_keys=(official_public_key(), load_public_key(read(public))))
        self.assertTrue(decode_package(read(signed), third_party).declaration["verified"])
        cli = dify("signature", "verify", signed, "-p", public)
        self.assertEqual(cli.status, 0)
        self.assertIn("partner", cli.stdout)
        self.assertEqual(dify("signature", "verify", signed).status, 1)

    def test_bad_private_key(self):
        """A private key file that is not a PKCS#1 RSA key is one error line."""
        key = os.path.join(self.directory, "bad.pem")
        write(key, "not a key\n")
        self.assertOneLineError(dify("signature", "sign", AGENT, "-p", key), "bad.pem")

    def test_missing_private_key(self):
        """A missing private key file is one error line."""
        self.assertOneLineError(dify("signature", "sign", AGENT, "-p", os.path.join(self.directory, "none.pem")),
                                "private key not found")

    def test_bad_public_key(self):
        """A public key in SPKI form is refused, as the daemon refuses it, in one line."""
        from cryptography.hazmat.primitives import serialization

        _, public = self.generate()
        spki = load_public_key(read(public)).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        path = os.path.join(self.directory, "spki.pem")
        write(path, spki)
        self.assertOneLineError(dify("signature", "verify", AGENT, "-p", path), "bad public key")


class BundleTests(OneLineErrorMixin, SynchronousTestCase):
    """dify bundle init, add and package."""

    def setUp(self):
        super().setUp()
        self.parent = self.mktemp()
        os.makedirs(self.parent)
        outcome = dify("bundle", "init", "--name", "kit", "--author", "acme", "--description", "A kit",
                       "-o", self.parent)
        self.assertEqual(outcome.status, 0, outcome.stderr)
        self.bundle = os.path.join(self.parent, "kit")

    def test_round_trip(self):
        """Packages, GitHub and marketplace dependencies go in; the daemon decodes the bundle."""
        added = dify("bundle", "add", "package", self.bundle, "-p", ALL_FIXTURES[2])
        self.assertEqual(added.status, 0, added.stderr)
        checksum = decode_package(read(ALL_FIXTURES[2]), POLICY).identifier.checksum
        self.assertTrue(os.path.isfile(os.path.join(self.bundle, "_assets", checksum)))
        self.assertEqual(dify("bundle", "add", "github", self.bundle, "-r", "acme/tools:1.0.0/tools.difypkg").status, 0)
        self.assertEqual(dify("bundle", "add", "marketplace", self.bundle, "-m", "acme/search:^1.2.0").status, 0)
        output = os.path.join(self.parent, "kit.difybndl")
        outcome = dify("bundle", "package", self.bundle, "-o", output)
        self.assertEqual(outcome.status, 0, outcome.stderr)
        dependencies = decode_bundle(read(output), POLICY, 12 * 52428800)
        self.assertEqual([item["type"] for item in dependencies], ["package", "github", "marketplace"])
        self.assertEqual(dependencies[0]["value"]["unique_identifier"], added.stdout.strip())

    def test_adding_twice(self):
        """The same package added twice is listed once."""
        for _ in range(2):
            self.assertEqual(dify("bundle", "add", "package", self.bundle, "-p", ALL_FIXTURES[2]).status, 0)
        manifest = yaml.safe_load(read(os.path.join(self.bundle, "manifest.yaml")))
        self.assertEqual(len(manifest["dependencies"]), 1)

    def test_bad_pattern(self):
        """A GitHub pattern the daemon refuses is one error line, and nothing is added."""
        outcome = dify("bundle", "add", "github", self.bundle, "-r", "no-version-here")
        self.assertOneLineError(outcome, "repo_pattern")
        manifest = yaml.safe_load(read(os.path.join(self.bundle, "manifest.yaml")))
        self.assertEqual(manifest["dependencies"], [])

    def test_not_a_bundle(self):
        """A directory without a bundle manifest is one error line."""
        self.assertOneLineError(dify("bundle", "package", self.parent), "manifest.yaml")


class MainDefaultsTests(SynchronousTestCase):
    """main() called as the console script calls it."""

    def test_streams_passed_in(self):
        """Output goes to the streams passed in, and the status is returned, not raised."""
        out = io.StringIO()
        status = main(["version"], stdin=io.StringIO(), stdout=out, stderr=io.StringIO())
        self.assertEqual(status, 0)
        self.assertTrue(out.getvalue().strip())

    def test_verify_output(self):
        """verify prints the category as key=value on stdout, nothing on stderr."""
        outcome = dify("signature", "verify", AGENT)
        self.assertEqual(outcome.stdout.strip(), "verified: authorized_category=langgenius")
        self.assertEqual(outcome.stderr, "")
