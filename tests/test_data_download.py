"""``python -m cl_vit.data.download`` against a loopback HTTP server serving a small archive the test makes."""
import hashlib
import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from data_gen import make_cifar

from cl_vit.data import build_source
from cl_vit.data import download as D
from cl_vit.errors import UserError


class Server:
    """Serves ``files`` (name -> bytes). ``range_support``: honour HTTP Range; ``cut_first``: the first request of a
    file sends only that many bytes, then closes the connection (an interrupted download)."""

    def __init__(self, files, range_support=True, cut_first=None):
        self.files, self.range_support, self.cut_first = files, range_support, cut_first
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                outer.requests.append((name, self.headers.get("Range")))
                data = outer.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and outer.range_support:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut_first is not None and len(outer.requests) == 1:
                    self.wfile.write(body[:outer.cut_first])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def cifar_archive(tmp_path):
    """A small cifar-10-python.tar.gz in the real layout, and its md5 registered as the published one."""
    make_cifar(tmp_path / "src", "cifar10", train_counts=[2] * 10, test_per_class=1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    data = buf.getvalue()
    return data, hashlib.md5(data).hexdigest()


def _register(monkeypatch, md5):
    real = D.DATASETS["cifar10"][0]
    monkeypatch.setitem(D.DATASETS, "cifar10", [D.Archive(real.url, md5, provides=real.provides)])


def test_download_verifies_and_extracts(tmp_path, cifar_archive, monkeypatch):
    data, md5 = cifar_archive
    _register(monkeypatch, md5)
    root = tmp_path / "data"
    with Server({"cifar-10-python.tar.gz": data}) as srv:
        assert D.main(["cifar10", "--root", str(root), "--mirror", srv.url]) == 0
    assert build_source("cifar10", root).n_classes == 10
    assert not list(root.glob("*.tar.gz*")) and not list(root.glob(".*"))  # archive removed, no temp folders
    with Server({}) as srv:  # already there: nothing is fetched
        assert D.main(["cifar10", "--root", str(root), "--mirror", srv.url]) == 0
        assert srv.requests == []


def test_interrupted_download_resumes_with_range(tmp_path, cifar_archive, monkeypatch):
    data, md5 = cifar_archive
    _register(monkeypatch, md5)
    with Server({"cifar-10-python.tar.gz": data}, cut_first=len(data) // 3) as srv:
        D.download("cifar10", tmp_path, mirror=srv.url, progress=False)
    assert srv.requests[0] == ("cifar-10-python.tar.gz", None)
    assert srv.requests[1] == ("cifar-10-python.tar.gz", f"bytes={len(data) // 3}-")
    assert (tmp_path / "cifar-10-batches-py" / "data_batch_5").is_file()


def test_leftover_part_restarts_cleanly(tmp_path, cifar_archive, monkeypatch):
    data, md5 = cifar_archive
    _register(monkeypatch, md5)
    # a .part from an earlier, killed run; this server ignores Range, so the download starts from zero
    (tmp_path / "cifar-10-python.tar.gz.part").write_bytes(data[:100])
    with Server({"cifar-10-python.tar.gz": data}, range_support=False) as srv:
        D.download("cifar10", tmp_path, mirror=srv.url, progress=False)
    assert (tmp_path / "cifar-10-batches-py" / "batches.meta").is_file()
    # a .part holding bytes of another file: resumed, the md5 fails, one clean retry from zero succeeds
    shutil_root = tmp_path / "again"
    shutil_root.mkdir()
    (shutil_root / "cifar-10-python.tar.gz.part").write_bytes(b"x" * 100)
    with Server({"cifar-10-python.tar.gz": data}) as srv:
        D.download("cifar10", shutil_root, mirror=srv.url, progress=False)
    assert [r[1] for r in srv.requests] == ["bytes=100-", None]
    assert (shutil_root / "cifar-10-batches-py").is_dir()


def test_checksum_mismatch_is_one_line_and_extracts_nothing(tmp_path, cifar_archive, capsys):
    data, _ = cifar_archive  # the real published md5 stays registered: the test archive cannot match it
    with Server({"cifar-10-python.tar.gz": data}) as srv:
        assert D.main(["cifar10", "--root", str(tmp_path), "--mirror", srv.url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cifar-10-python.tar.gz from ") and "\n" not in err
    assert "not the published c58f30108f718f92721af3b95e74349a" in err
    assert not (tmp_path / "cifar-10-batches-py").exists() and not list(tmp_path.glob("*.part"))


def test_unknown_and_manual_datasets(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'nope'"):
        D.download("nope", tmp_path)
    with pytest.raises(UserError, match="imagenet-lt cannot be downloaded automatically.*image-net.org"):
        D.download("imagenet-lt", tmp_path)
    assert D.DATASETS["cifar100"][0].md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    assert D.DATASETS["imagenet-r"][0].url == "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"


def test_imagenet_r_brings_codas_split_files_checked_by_sha256(tmp_path, monkeypatch):
    from data_gen import WNIDS, make_imagenet_r, write_coda_split

    root = make_imagenet_r(tmp_path, per_class=3)  # the images are there: only the split files are fetched
    write_coda_split(tmp_path / "served", root, {w: k for k, w in enumerate(WNIDS)})
    served = {p.name: p.read_bytes() for p in (tmp_path / "served").iterdir()}
    real = D.FILES["imagenet-r"]
    assert all("/6417d4f68754be68b697c7ca2323ee61e791e1a3/" in url for url, _, _ in real)  # a pinned commit
    files = [(url, hashlib.sha256(served[rel.rsplit("/", 1)[-1]]).hexdigest(), rel) for url, _, rel in real]
    monkeypatch.setitem(D.FILES, "imagenet-r", files)
    with Server(served) as srv:
        D.download("imagenet-r", tmp_path, mirror=srv.url, progress=False)
    src = build_source("imagenet-r", tmp_path, wnids=WNIDS, img_size=32)  # the default split: coda
    assert src.meta["split"]["name"] == "coda" and src.meta["split"]["split_dir"] == str(
        tmp_path / "imagenet-r-splits" / "coda")
    # a file whose sha256 differs is deleted and named
    (tmp_path / "imagenet-r-splits" / "coda" / "imagenet-r_test.yaml").unlink()
    monkeypatch.setitem(D.FILES, "imagenet-r", [(files[1][0], "0" * 64, files[1][2])])
    with Server(served) as srv, pytest.raises(UserError, match="imagenet-r_test.yaml .* has sha256"):
        D.download("imagenet-r", tmp_path, mirror=srv.url, progress=False)
    assert not (tmp_path / "imagenet-r-splits" / "coda" / "imagenet-r_test.yaml").exists()


def _tar(path, members):
    """A .tar.gz of ``members``: (name, bytes) for a file, (name, "->target") for a symbolic link."""
    with tarfile.open(path, "w:gz") as tar:
        for name, body in members:
            info = tarfile.TarInfo(name)
            if isinstance(body, str):
                info.type, info.linkname = tarfile.SYMTYPE, body[2:]
                tar.addfile(info)
            else:
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return path


@pytest.mark.parametrize("python", ["with data_filter", "without data_filter"])
@pytest.mark.parametrize("bad", [("../escaped.txt", b"x"), ("ABS/escaped_abs.txt", b"x"), ("data/link", "->/etc/passwd")])
def test_an_archive_member_that_leaves_its_folder_is_refused(tmp_path, monkeypatch, python, bad):
    if python == "without data_filter":  # the Pythons before 3.10.12 / 3.11.4, which extracted it
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    bad = (bad[0].replace("ABS", str(tmp_path)), bad[1])
    archive = _tar(tmp_path / "a.tar.gz", [("data/ok.txt", b"ok"), bad])
    into = tmp_path / "out" / "root"
    with pytest.raises(UserError) as e:
        D.extract(archive, into)
    assert "\n" not in str(e.value) and "delete it and download again" in str(e.value)
    assert not list(tmp_path.rglob("escaped.txt")) and not list(into.rglob("link"))
    assert not list(tmp_path.rglob("escaped_abs.txt"))
    D.extract(_tar(tmp_path / "b.tar.gz", [("data/ok.txt", b"ok")]), into)  # a plain archive still extracts
    assert (into / "data" / "ok.txt").read_bytes() == b"ok"
