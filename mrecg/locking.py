"""One run per output folder: an exclusive lock, held from the first check of the folder to the last file.

``DIR/.mrecg.lock`` says who holds the folder (pid, host, start time, command line); the lock itself is an
``fcntl.flock`` on that file, which the operating system drops when the holder ends, however it ends
(Ctrl-C, SIGKILL, a crash). So a lock file whose flock can be taken belongs to a dead run: it is taken
over, and the caller is told whose it was. Where ``fcntl`` is missing (Windows) the file is created
exclusively and a holder whose pid no longer runs on this host counts as dead. On network filesystems
without working ``flock`` two hosts may both get the lock: give each run its own ``--output`` there.
"""
import json
import os
import socket
import sys
import time
from typing import Any, Dict, Optional

from mrecg.errors import UserError

LOCK_NAME = '.mrecg.lock'

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class FolderBusy(UserError):
    """Another live run holds the output folder."""


def holder_text(info: Dict[str, Any]) -> str:
    """'pid 123 on host, since 12:00:01: ptq_main.py --config ...' from a lock file's content."""
    since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['started'])) if 'started' in info else '?'
    command = info.get('command', '')
    return (f'pid {info.get("pid", "?")} on {info.get("host", "?")}, since {since}'
            + (f': {command}' if command else ''))


def _read(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


class FolderLock:
    """``with FolderLock(folder):`` the body runs as the folder's only writer, or ``FolderBusy`` is raised
    naming the live holder. ``taken_over`` is the dead holder's description when a stale lock was taken."""

    def __init__(self, folder: str, command: Optional[str] = None):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.command = command if command is not None else ' '.join(os.path.basename(a) if i == 0 else a
                                                                       for i, a in enumerate(sys.argv))
        self.fd: Optional[int] = None
        self.taken_over: Optional[str] = None

    def __enter__(self) -> 'FolderLock':
        for _ in range(10):  # a holder releasing between our open and our flock: open the new file again
            try:
                os.makedirs(self.folder, exist_ok=True)
                if self._try_once():
                    return self
            except FolderBusy:
                raise
            except OSError as exc:
                raise UserError(f'cannot write to the output folder {self.folder}: {exc.strerror or exc} '
                                '(choose another --output)') from None
        raise FolderBusy(f'{self.folder} is in use by another run and its lock keeps changing hands; '
                         'try again, or choose another --output')

    def _try_once(self) -> bool:
        if fcntl is None:  # pragma: no cover - Windows
            return self._try_exclusive_create()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            info = _read(self.path)
            os.close(fd)
            raise FolderBusy(f'{self.folder} is in use by another run ({holder_text(info)}); wait for it to end, '
                             'or choose another --output' + (' (the default --output does not depend on --set)'
                                                             if '--set' in info.get('command', '') else '')) from None
        try:
            same = os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except OSError:
            same = False
        if not same:  # the previous holder removed the file after we opened it: lock the current one
            os.close(fd)
            return False
        old = _read(self.path)
        if old:
            self.taken_over = holder_text(old)
        self._write(fd)
        self.fd = fd
        return True

    def _try_exclusive_create(self) -> bool:  # pragma: no cover - Windows
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = _read(self.path)
            if info.get('host') == socket.gethostname() and not _pid_alive(info.get('pid')):
                self.taken_over = holder_text(info)
                os.remove(self.path)
                return False
            raise FolderBusy(f'{self.folder} is in use by another run ({holder_text(info)}); wait for it to end, '
                             'or choose another --output') from None
        self._write(fd)
        self.fd = fd
        return True

    def _write(self, fd: int) -> None:
        text = json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), 'started': time.time(),
                           'command': self.command})
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, text.encode())
        os.fsync(fd)

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.remove(self.path)  # removed while still locked: a waiting opener sees the inode change
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
