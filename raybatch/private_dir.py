"""Private per-user scratch directories on a node: ``<tmp>/raybatch-<uid>/<name>``
(and, at the end, the server's own state directory's modes).

Why: ``/tmp`` is shared by every user of a node. A fixed name there (``/tmp/raybatch-jobs``)
can be created first by someone else, who then reads or swaps what our jobs write in it
(job environments, hostfiles, outputs before they are uploaded). So every directory raybatch
keeps under the system temp directory hangs below one per-user root that is

- created with mode 0700 when missing, and
- when it already exists: a real directory (not a link), owned by this uid, that neither
  group nor others can write; anything else is refused with an error saying what is wrong
  and how to fix it (never used, never "repaired": a directory someone else could write
  into may already hold their files, or be swapped under us). One of ours that others
  could only read or enter (made by a plain ``mkdir -p`` under a 022 umask before this
  check ran, e.g. by a rank creating a directory below it) is tightened to 0700: nobody
  else can have put anything in it.

The same checks apply to the ``<name>`` level below it. Everything further down inherits
the protection (nobody else can enter the root).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

__all__ = ["PrivateDirError", "private_root", "private_tmp", "private_path", "ensure_private_parents",
           "PRIVATE_UMASK", "tighten_state_dir"]


class PrivateDirError(PermissionError):
    """A per-user directory exists but is not private to us (owner, mode or type)."""


def _check_name(name: str) -> str:
    if (not name or name in (".", "..") or "/" in name or "\0" in name or os.sep in name
            or (os.altsep and os.altsep in name)):
        raise ValueError(f"private directory name {name!r}: one path component expected "
                         "(no '/', NUL, '.' or '..')")
    return name


def root_path() -> Path:
    """Where this user's root is (not created, not checked)."""
    return Path(tempfile.gettempdir()) / f"raybatch-{os.getuid()}"


def private_path(name: str) -> Path:
    """``<tmp>/raybatch-<uid>/<name>`` as a path only: for code that computes paths on one
    machine (the driver) that another (a rank's node) creates with ``private_tmp``."""
    return root_path() / _check_name(name)


def _ensure(path: Path) -> None:
    """Create ``path`` 0700, or check that the existing one is ours and private. Checked
    and tightened through one descriptor opened without following a link, so what is
    checked is what is changed."""
    uid = os.getuid()
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if os.path.islink(path):
            raise PrivateDirError(f"{path} is a symbolic link, not raybatch's private directory: "
                                  f"remove it (someone may have planted it) and retry") from None
        raise PrivateDirError(f"{path} cannot be used as raybatch's private directory: "
                              f"{e.strerror or e}; remove it and retry") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != uid:
            raise PrivateDirError(f"{path} belongs to uid {st.st_uid}, not to this user (uid {uid}): "
                                  f"refusing to keep job data there; have it removed and retry")
        if st.st_mode & 0o022:
            raise PrivateDirError(f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: group or others may "
                                  f"write it, so someone else may have put files there; raybatch needs "
                                  f"0700 (check its contents, then `chmod 700 {path}` or remove it) and retry")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)  # new (the umask may have removed bits), or ours and only readable
    finally:
        os.close(fd)


def private_root() -> Path:
    """This user's verified 0700 root ``<tmp>/raybatch-<uid>``."""
    root = root_path()
    _ensure(root)
    return root


def private_tmp(name: str) -> Path:
    """A verified 0700 directory ``<tempfile.gettempdir()>/raybatch-<uid>/<name>`` (created
    when missing). Raises ``PrivateDirError`` when it, or the root above it, exists but is
    not this user's private directory."""
    _check_name(name)
    path = private_root() / name
    _ensure(path)
    return path


def ensure_private_parents(path: str | os.PathLike[str]) -> None:
    """If ``path`` lies below this user's root, create/verify the root and its first level
    (``private_tmp``) before anything under it is made: what a node calls before it makes a
    directory the driver named with ``private_path``. Other paths are left alone."""
    root = root_path()
    try:
        rel = Path(os.path.abspath(path)).relative_to(root)
    except ValueError:
        return
    if rel.parts:
        private_tmp(rel.parts[0])
    else:
        private_root()


PRIVATE_UMASK = 0o077  # what the server and the local default's processes create: theirs alone


def tighten_state_dir(state_dir: Path) -> None:
    """The server's state is its user's alone: the directory 0700; the job store (its
    environment values), its WAL and shared-memory files, the token and the code
    packages' directory as well, also when an older version left them group/world
    readable. New files are created private by the server's umask (``PRIVATE_UMASK``)."""
    state_dir = Path(state_dir)
    targets = [(state_dir, 0o700), (state_dir / "code", 0o700)]
    targets += [(state_dir / name, 0o600) for name in
                ("raybatch.db", "raybatch.db-wal", "raybatch.db-shm", "raybatch.db-journal", "token")]
    for path, mode in targets:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISLNK(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(path, mode)
    code = state_dir / "code"
    if code.is_dir() and not code.is_symlink():
        for entry in os.scandir(code):
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
                os.chmod(entry.path, 0o600)
