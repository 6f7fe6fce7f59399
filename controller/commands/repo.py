"""``edgectl init`` and ``edgectl keys ...``: create a repository and run its key ceremony."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from controller.commands.common import RAW, print_json

if TYPE_CHECKING:
    from datetime import datetime

    from controller.commands.common import Subparsers
    from controller.repository.ceremony import CeremonyResult
    from controller.repository.repo import Repository


def _iso(when: datetime) -> str:
    """A metadata expiry as ISO 8601 UTC, as ``keys list`` prints it."""
    return f"{when:%Y-%m-%dT%H:%M:%SZ}"


def _cmd_init(args: argparse.Namespace) -> int:
    from controller.repository.repo import ExpiryPolicy, init_repository

    policy = ExpiryPolicy(
        root_days=args.expiry_days_root,
        targets_days=args.expiry_days_targets,
        rollout_days=args.expiry_days_rollout,
        snapshot_days=args.expiry_days_snapshot,
        timestamp_days=args.expiry_days_timestamp,
    )
    repo = init_repository(Path(args.repo_dir), policy)
    if args.json:
        print_json(_init_json(repo))
        return 0
    print(f"initialised repository {repo.path}")
    print(f"  keys:     {repo.keys_dir} (keep root.pem and targets.pem offline when you can)")
    print(f"  metadata: {repo.metadata_dir} (enroll agents with {repo.metadata_dir}/root.json)")
    print(f"  targets:  {repo.targets_dir}")
    return 0


def _init_json(repo: Repository) -> dict[str, object]:
    """What ``init --json`` reports: where things are and each role's public key ids and
    key file paths (never the keys themselves)."""
    from controller.repository.ceremony import key_status
    from controller.repository.keys import key_files

    return {
        "repo": str(repo.path),
        "keys_dir": str(repo.keys_dir),
        "metadata_dir": str(repo.metadata_dir),
        "targets_dir": str(repo.targets_dir),
        "root_metadata": str(repo.metadata_dir / "root.json"),
        "roles": [
            {
                "role": row.role,
                "version": row.version,
                "threshold": row.threshold,
                "expires": _iso(row.expires),
                "keyids": row.keyids,
                "key_files": [str(p) for p in key_files(repo.keys_dir, row.role)],
            }
            for row in key_status(repo)
        ],
    }


def _open_for_keys(args: argparse.Namespace) -> tuple[Path, tuple[Path, ...]]:
    extra = tuple(Path(d) for d in (getattr(args, "key_dir", None) or []))
    return Path(args.repo), extra


def _ceremony_json(result: CeremonyResult) -> dict[str, object]:
    """A key ceremony's outcome for ``--json``: key ids and file paths, never key bytes."""
    return {
        "role": result.role,
        "new_keys": [
            {"keyid": keyid, "file": str(path)}
            for keyid, path in zip(result.new_keyids, result.key_files, strict=False)
        ],
        "root_version": result.root_version,
        "resigned": result.resigned,
        "revoked": result.revoked,
        "waits_for_signatures": result.pending is not None,
        "pending": None if result.pending is None else str(result.pending),
        "missing": result.missing or None,
    }


def _print_ceremony(result: CeremonyResult) -> None:
    for keyid, path in zip(result.new_keyids, result.key_files, strict=False):
        print(f"  new {result.role} key {keyid[:16]}… -> {path}")
    if result.root_version is not None:
        print(
            f"  published root version {result.root_version} "
            "(devices follow it on their next check)"
        )
    if result.resigned:
        print("  re-signed: " + ", ".join(f"{r} v{v}" for r, v in result.resigned.items()))
    for keyid in result.revoked:
        print(f"  revoked key {keyid[:16]}… (its file is deleted)")
    if result.pending is not None:
        print(f"  root waits for signatures: {result.missing or 'complete'}")
        print(
            "  next: edgectl keys export-root --repo REPO -o root.json, sign it offline with "
            "edgectl keys sign-root root.json --key KEY.pem, then edgectl keys import-root "
            "root.json --repo REPO"
        )


def _cmd_keys_list(args: argparse.Namespace) -> int:
    from controller.repository.ceremony import key_status
    from controller.repository.repo import Repository

    repo_dir, extra = _open_for_keys(args)
    rows = key_status(Repository.open(repo_dir, extra))
    if args.json:
        print_json(
            [
                {
                    "role": row.role,
                    "version": row.version,
                    "threshold": row.threshold,
                    "expires": f"{row.expires:%Y-%m-%dT%H:%M:%SZ}",
                    "keys": [{"keyid": k, "here": k in row.present} for k in row.keyids],
                }
                for row in rows
            ]
        )
        return 0
    for row in rows:
        print(
            f"{row.role:<10} v{row.version:<4} threshold {row.threshold}/{len(row.keyids)}  "
            f"expires {row.expires:%Y-%m-%dT%H:%M:%SZ}  keys here {len(row.present)}"
        )
        for keyid in row.keyids:
            where = "here" if keyid in row.present else "offline"
            print(f"    {keyid[:16]}… ({where})")
    return 0


def _cmd_keys_rotate(args: argparse.Namespace) -> int:
    from controller.repository.ceremony import rotate
    from controller.repository.rotation import locked_repository

    repo_dir, extra = _open_for_keys(args)
    with locked_repository(repo_dir, extra) as repo:
        result = rotate(
            repo,
            args.role,
            count=args.keys,
            threshold=args.threshold,
            key_out=extra[0] if extra else None,
        )
    code = 0 if result.pending is None else 3
    if args.json:
        print_json(_ceremony_json(result))
        return code
    print(f"rotated the {args.role} key" + (" (root pending)" if result.pending else ""))
    _print_ceremony(result)
    return code


def _cmd_keys_finish(args: argparse.Namespace) -> int:
    from controller.repository.rotation import finish_rotation, locked_repository, roll_forward

    repo_dir, extra = _open_for_keys(args)
    with locked_repository(repo_dir, extra, finish=False) as repo:
        interrupted = roll_forward(repo)
        result = interrupted or finish_rotation(repo)
    if args.json:
        print_json({"interrupted": interrupted is not None, **_ceremony_json(result)})
        return 0
    print(
        "finished an interrupted rotation"
        if interrupted is not None
        else "no rotation was interrupted; every role verifies"
    )
    _print_ceremony(result)
    return 0


def _cmd_keys_export_root(args: argparse.Namespace) -> int:
    from controller.repository.ceremony import export_root
    from controller.repository.rotation import locked_repository

    repo_dir, extra = _open_for_keys(args)
    with locked_repository(repo_dir, extra) as repo:
        result = export_root(repo, Path(args.output))
    if args.json:
        print_json(
            {
                "output": str(result.pending),
                "complete": not result.missing,
                "missing": result.missing or None,
            }
        )
        return 0
    print(f"wrote the root waiting for signatures to {args.output}")
    print(f"  {result.missing or 'all signatures present: import it'}")
    return 0


def _cmd_keys_sign_root(args: argparse.Namespace) -> int:
    from controller.repository.ceremony import sign_root_file

    signed = sign_root_file(Path(args.file), [Path(k) for k in args.key])
    if args.json:
        print_json({"file": args.file, "signed_by": signed})
        return 0
    for keyid in signed:
        print(f"signed {args.file} with key {keyid[:16]}…")
    return 0


def _cmd_keys_import_root(args: argparse.Namespace) -> int:
    from controller.repository.ceremony import import_root
    from controller.repository.rotation import locked_repository

    repo_dir, extra = _open_for_keys(args)
    with locked_repository(repo_dir, extra) as repo:
        result = import_root(repo, Path(args.file))
    if args.json:
        print_json({"file": args.file, **_ceremony_json(result)})
        return 0
    print(f"imported {args.file}")
    _print_ceremony(result)
    return 0


def _cmd_keys_expiry(args: argparse.Namespace) -> int:
    from controller.repository.ceremony import set_expiry
    from controller.repository.rotation import locked_repository

    repo_dir, extra = _open_for_keys(args)
    with locked_repository(repo_dir, extra) as repo:
        _policy, resigned = set_expiry(repo, args.role, args.days)
        expires = repo.load(args.role).signed.expires
    if args.json:
        print_json(
            {
                "role": args.role,
                "days": args.days,
                "resigned": resigned,
                "expires": _iso(expires),
                "next_signature_applies": not resigned and args.role in ("root", "targets"),
            }
        )
        return 0
    print(f"{args.role} metadata now lives {args.days:g} day(s) after each signature")
    if resigned:
        print("  re-signed now: " + ", ".join(f"{r} v{v}" for r, v in resigned.items()))
    elif args.role in ("root", "targets"):
        print("  takes effect the next time it is signed")
    return 0


def _add_keys_parser(sub: Subparsers) -> None:
    from controller.repository.repo import ALL_ROLES

    keys = sub.add_parser(
        "keys",
        help="key lifecycle: list, rotate, offline root signing, expiry per role",
        description="Signing keys of the repository (docs/security.md: the key ceremony).",
        epilog="examples:\n  edgectl keys list --repo ./repo\n"
        "  edgectl keys rotate timestamp --repo ./repo\n"
        "exit status 3: a new root waits for offline signatures (keys export-root)",
        formatter_class=RAW,
    )
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")

    def repo_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--repo", required=True, metavar="REPO_DIR")
        p.add_argument(
            "--key-dir",
            action="append",
            metavar="DIR",
            help="another folder holding private keys (an offline medium); repeatable",
        )

    ls = ksub.add_parser(
        "list",
        help="every role's keys, threshold, expiry and which private keys are here",
        description="Every role's key ids, threshold, version, expiry, and whether each "
        "private key is in keys/ (or a --key-dir).",
        epilog="example:\n  edgectl keys list --repo ./repo",
        formatter_class=RAW,
    )
    repo_options(ls)
    ls.add_argument("--json", action="store_true", help="print JSON for scripts")
    ls.set_defaults(func=_cmd_keys_list)

    rot = ksub.add_parser(
        "rotate",
        help="replace a role's key and revoke the old one; devices follow untouched",
        description="Make a new key for ROLE and revoke the old one. Top-level roles change "
        "in a new root version signed by the current root keys (and, for root, by the new "
        "ones too), then the role is re-signed. When root keys are not here the new root "
        "waits in REPO_DIR/root-pending.json (exit status 3): export, sign offline, import. "
        "A new snapshot, timestamp or rollout key always goes to REPO_DIR/keys, where serve "
        "signs with it; a new root or targets key goes to the first --key-dir if given. An "
        "interrupted rotation is finished by the next change (or `edgectl keys finish`).",
        epilog="examples:\n  edgectl keys rotate timestamp --repo ./repo\n"
        "  edgectl keys rotate root --repo ./repo --keys 3 --threshold 2 --key-dir /media/usb",
        formatter_class=RAW,
    )
    rot.add_argument("role", metavar="ROLE", choices=ALL_ROLES)
    repo_options(rot)
    rot.add_argument("--keys", type=int, default=1, metavar="N", help="root: how many keys")
    rot.add_argument(
        "--threshold", type=int, default=1, metavar="K", help="root: signatures required (K of N)"
    )
    rot.add_argument("--json", action="store_true", help="print JSON for scripts")
    rot.set_defaults(func=_cmd_keys_rotate)

    fin = ksub.add_parser(
        "finish",
        help="finish a key rotation that was interrupted (re-sign, delete revoked keys)",
        description="Finish a rotation left half-done (Ctrl-C, a crash, a full disk): publish "
        "the new root or targets version it journaled, re-sign every role the trusted keys no "
        "longer verify and delete revoked key files. Any change to the repository and "
        "`edgectl serve`'s re-sign check do the same; this is for when the new key is on an "
        "offline medium (pass --key-dir). Idempotent.",
        epilog="example:\n  edgectl keys finish --repo ./repo --key-dir /media/usb",
        formatter_class=RAW,
    )
    repo_options(fin)
    fin.add_argument("--json", action="store_true", help="print JSON for scripts")
    fin.set_defaults(func=_cmd_keys_finish)

    ex = ksub.add_parser(
        "export-root",
        help="write the root version waiting for offline signatures (or a renewal) to a file",
        description="Write REPO_DIR/root-pending.json to FILE. With none pending, make one: "
        "the current root as the next version with a renewed expiry.",
        epilog="example:\n  edgectl keys export-root --repo ./repo -o root-unsigned.json",
        formatter_class=RAW,
    )
    repo_options(ex)
    ex.add_argument("-o", "--output", required=True, metavar="FILE")
    ex.add_argument("--json", action="store_true", help="print JSON for scripts")
    ex.set_defaults(func=_cmd_keys_export_root)

    sg = ksub.add_parser(
        "sign-root",
        help="add signatures to an exported root (on the offline machine)",
        description="Sign FILE with each --key; needs no repository.",
        epilog="example:\n  edgectl keys sign-root root-unsigned.json --key /media/usb/root-1.pem",
        formatter_class=RAW,
    )
    sg.add_argument("file", metavar="FILE")
    sg.add_argument("--key", action="append", required=True, metavar="KEY.pem")
    sg.add_argument("--json", action="store_true", help="print JSON for scripts")
    sg.set_defaults(func=_cmd_keys_sign_root)

    im = ksub.add_parser(
        "import-root",
        help="check a signed root (both thresholds), publish it and finish the rotation",
        description="Publish FILE as the next root version when a threshold of the current "
        "root keys and of its own keys signed it; re-sign what the rotation needs and delete "
        "revoked keys.",
        epilog="example:\n  edgectl keys import-root root-signed.json --repo ./repo",
        formatter_class=RAW,
    )
    im.add_argument("file", metavar="FILE")
    repo_options(im)
    im.add_argument("--json", action="store_true", help="print JSON for scripts")
    im.set_defaults(func=_cmd_keys_import_root)

    exp = ksub.add_parser(
        "expiry",
        help="how long a role's metadata stays valid after each signature",
        description="Set ROLE's metadata lifetime in DAYS (fractions allowed: 0.25 = 6 h). "
        "Online roles past the new lifetime are re-signed now.",
        epilog="example:\n  edgectl keys expiry timestamp 0.25 --repo ./repo",
        formatter_class=RAW,
    )
    exp.add_argument("role", metavar="ROLE", choices=ALL_ROLES)
    exp.add_argument("days", type=float, metavar="DAYS")
    repo_options(exp)
    exp.add_argument("--json", action="store_true", help="print JSON for scripts")
    exp.set_defaults(func=_cmd_keys_expiry)


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "init",
        help="create signing keys and an empty signed repository",
        description="Create Ed25519 keys (REPO_DIR/keys, 0600) and an empty TUF repository.",
        epilog="example:\n  edgectl init ./repo --expiry-days-timestamp 1",
        formatter_class=RAW,
    )
    p.add_argument("repo_dir", metavar="REPO_DIR")
    for role, days in (
        ("root", 365),
        ("targets", 365),
        ("rollout", 30),
        ("snapshot", 7),
        ("timestamp", 1),
    ):
        p.add_argument(
            f"--expiry-days-{role}",
            type=int,
            default=days,
            metavar="DAYS",
            help=f"{role} metadata lifetime (default {days})",
        )
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=_cmd_init)

    _add_keys_parser(sub)
