"""An in-memory Google Cloud Storage server for tests, speaking the JSON API on 127.0.0.1.

The clients a run uses reach it through their own emulator settings (`environment()`):
tensorstore (orbax's arrays) through TENSORSTORE_GCS_HTTP_URL, gcsfs (etils.epath with
EPATH_USE_TF=false: every other file) through STORAGE_EMULATOR_HOST. It implements what those
clients call: object metadata, media downloads with byte ranges, media / multipart / resumable
uploads, listing with prefix, delimiter and offsets, deletes (single and batched), bucket
lookup, and the generation preconditions (ifGenerationMatch, ifGenerationNotMatch, the
x-goog-generation header) that tensorstore's caching and conditional writes depend on.
Published emulators were tried first; the one on the package registry omits the generation
header and the preconditions, and tensorstore's OCDBT writes fail against it.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.server
import itertools
import json
import re
import threading
import urllib.parse
from typing import Any

_GENERATIONS = itertools.count(1_000_001)


class Bucket:
  """The stored objects: name -> (data, generation)."""

  def __init__(self, name: str):
    self.name = name
    self.objects: dict[str, tuple[bytes, int]] = {}
    self.downloaded: set[str] = set()  # names whose content a client fetched
    self.lock = threading.Lock()

  def names(self, prefix: str = "") -> list[str]:
    with self.lock:
      return sorted(n for n in self.objects if n.startswith(prefix))

  def read(self, name: str) -> bytes:
    with self.lock:
      return self.objects[name][0]

  def put(self, name: str, data: bytes) -> None:
    with self.lock:
      self.objects[name] = (data, next(_GENERATIONS))


def _resource(bucket: str, name: str, data: bytes, generation: int) -> dict[str, Any]:
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
  return {"kind": "storage#object", "bucket": bucket, "name": name, "id": f"{bucket}/{name}",
          "generation": str(generation), "metageneration": "1", "size": str(len(data)),
          "contentType": "application/octet-stream", "timeCreated": now, "updated": now,
          "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode(),
          "storageClass": "STANDARD"}


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  server: "_Server"

  def log_message(self, *args):  # quiet
    pass

  def handle_one_request(self):
    try:
      super().handle_one_request()
    except (ConnectionError, BrokenPipeError):
      self.close_connection = True
    except Exception as e:  # a route's bug answers 500 (the client reports it) instead of
      try:                  # dropping the connection
        self._error(500, f"{type(e).__name__}: {e}")
      except OSError:
        self.close_connection = True

  # -- plumbing ---------------------------------------------------------------------------

  def _body(self) -> bytes:
    length = int(self.headers.get("Content-Length") or 0)
    return self.rfile.read(length) if length else b""

  def _reply(self, status: int, body: bytes = b"", content_type: str = "application/json",
             headers: dict[str, str] | None = None):
    self.send_response(status)
    for key, value in (headers or {}).items():
      self.send_header(key, value)
    if body or status not in (204, 304):
      self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if body:
      self.wfile.write(body)

  def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None):
    self._reply(status, json.dumps(payload).encode(), headers=headers)

  def _error(self, status: int, message: str):
    self._json(status, {"error": {"code": status, "message": message}})

  def _parse(self):
    url = urllib.parse.urlsplit(self.path)
    return url.path, {k: v[-1] for k, v in urllib.parse.parse_qs(
        url.query, keep_blank_values=True).items()}

  def _bucket(self, name: str) -> Bucket | None:
    return self.server.buckets.get(name)

  @staticmethod
  def _precondition_fails(query: dict[str, str], current: int | None) -> int | None:
    """The status a failed precondition answers (412 / 304), or None when all hold."""
    match = query.get("ifGenerationMatch")
    if match is not None and int(match) != (current or 0):
      return 412
    not_match = query.get("ifGenerationNotMatch")
    if not_match is not None and current is not None and int(not_match) == current:
      return 304
    return None

  def _store(self, bucket: Bucket, name: str, data: bytes, query: dict[str, str]):
    with bucket.lock:
      current = bucket.objects.get(name, (None, None))[1]
      failed = self._precondition_fails(query, current)
      if failed == 412:
        return self._error(412, "precondition failed")
      generation = next(_GENERATIONS)
      bucket.objects[name] = (data, generation)
    self._json(200, _resource(bucket.name, name, data, generation))

  # -- routes -----------------------------------------------------------------------------

  def do_GET(self):
    path, query = self._parse()
    m = re.fullmatch(r"(?:/download)?/storage/v1/b/([^/]+)/o/(.+)", path)
    if m:
      bucket, name = self._bucket(m[1]), urllib.parse.unquote(m[2])
      if bucket is None:
        return self._error(404, "no such bucket")
      with bucket.lock:
        data, generation = bucket.objects.get(name, (None, None))
      if data is None:
        return self._error(404, "no such object")
      failed = self._precondition_fails(query, generation)
      if failed:
        return self._reply(failed, headers={"x-goog-generation": str(generation)})
      if query.get("alt") != "media":
        return self._json(200, _resource(bucket.name, name, data, generation))
      with bucket.lock:
        bucket.downloaded.add(name)
      headers = {"x-goog-generation": str(generation), "x-goog-metageneration": "1"}
      byte_range = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "") or "")
      if byte_range:
        start = int(byte_range[1])
        end = min(len(data), int(byte_range[2]) + 1) if byte_range[2] else len(data)
        if start >= len(data) and len(data):
          return self._error(416, "range not satisfiable")
        headers["Content-Range"] = f"bytes {start}-{max(end - 1, start)}/{len(data)}"
        return self._reply(206, data[start:end], "application/octet-stream", headers)
      return self._reply(200, data, "application/octet-stream", headers)
    m = re.fullmatch(r"/storage/v1/b/([^/]+)/o/?", path)
    if m:
      return self._list(m[1], query)
    m = re.fullmatch(r"/storage/v1/b/([^/]+)/?", path)
    if m:
      if self._bucket(m[1]) is None:
        return self._error(404, "no such bucket")
      return self._json(200, {"kind": "storage#bucket", "name": m[1], "id": m[1],
                              "location": "US", "storageClass": "STANDARD"})
    self._error(404, f"unknown route {path}")

  def _list(self, bucket_name: str, query: dict[str, str]):
    bucket = self._bucket(bucket_name)
    if bucket is None:
      return self._error(404, "no such bucket")
    prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
    start, end = query.get("startOffset", ""), query.get("endOffset", "")
    page_start = query.get("pageToken", "")
    limit = int(query.get("maxResults") or 1000)
    items, prefixes = [], set()
    with bucket.lock:
      snapshot = sorted(bucket.objects.items())
    entries = []
    for name, (data, generation) in snapshot:
      if not name.startswith(prefix) or (start and name < start) or (end and name >= end):
        continue
      rest = name[len(prefix):]
      if delimiter and delimiter in rest:
        entries.append((prefix + rest.split(delimiter)[0] + delimiter, None))
      else:
        entries.append((name, (data, generation)))
    seen, ordered = set(), []
    for key, value in entries:
      if key not in seen:
        seen.add(key)
        ordered.append((key, value))
    ordered = [e for e in ordered if e[0] > page_start] if page_start else ordered
    page, more = ordered[:limit], ordered[limit:]
    for key, value in page:
      if value is None:
        prefixes.add(key)
      else:
        items.append(_resource(bucket.name, key, *value))
    payload: dict[str, Any] = {"kind": "storage#objects", "items": items,
                               "prefixes": sorted(prefixes)}
    if more:
      payload["nextPageToken"] = page[-1][0]
    self._json(200, payload)

  def do_POST(self):
    path, query = self._parse()
    if "upload_id" in query:  # gcsfs sends a resumable upload's chunks with POST
      return self.do_PUT()
    body = self._body()
    m = re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o/?", path)
    if m:
      bucket = self._bucket(m[1])
      if bucket is None:
        return self._error(404, "no such bucket")
      kind = query.get("uploadType", "media")
      if kind == "media":
        return self._store(bucket, query["name"], body, query)
      if kind == "multipart":
        metadata, data = _split_multipart(body, self.headers.get("Content-Type", ""))
        return self._store(bucket, metadata.get("name") or query["name"], data, query)
      if kind == "resumable":
        name = (json.loads(body) if body else {}).get("name") or query.get("name")
        upload_id = f"u{next(_GENERATIONS)}"
        self.server.uploads[upload_id] = (bucket.name, name, bytearray(), query)
        location = (f"http://{self.headers.get('Host')}/upload/storage/v1/b/{bucket.name}/o?"
                    f"uploadType=resumable&upload_id={upload_id}")
        return self._reply(200, headers={"Location": location})
    if path == "/batch/storage/v1":
      return self._batch(body, self.headers.get("Content-Type", ""))
    m = re.fullmatch(r"/storage/v1/b/?", path)
    if m:
      name = json.loads(body)["name"]
      self.server.buckets.setdefault(name, Bucket(name))
      return self._json(200, {"kind": "storage#bucket", "name": name, "id": name})
    self._error(404, f"unknown route {path}")

  def do_PUT(self):
    path, query = self._parse()
    body = self._body()
    upload = self.server.uploads.get(query.get("upload_id", ""))
    if upload is None:
      return self._error(404, "no such upload")
    bucket_name, name, received, upload_query = upload
    received.extend(body)
    total = re.search(r"/(\d+|\*)$", self.headers.get("Content-Range", "") or "")
    if total and total[1] != "*" and len(received) >= int(total[1]):
      del self.server.uploads[query["upload_id"]]
      return self._store(self.server.buckets[bucket_name], name, bytes(received), upload_query)
    headers = {"Range": f"bytes=0-{len(received) - 1}"} if received else {}
    self._reply(308, headers=headers)

  def do_DELETE(self):
    path, query = self._parse()
    status = self._delete(path, query)
    if status == 204:
      return self._reply(204)
    self._error(status, "delete failed")

  def _delete(self, path: str, query: dict[str, str]) -> int:
    m = re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)", path)
    if not m or self._bucket(m[1]) is None:
      return 404
    bucket, name = self._bucket(m[1]), urllib.parse.unquote(m[2])
    with bucket.lock:
      if name not in bucket.objects:
        return 404
      if self._precondition_fails(query, bucket.objects[name][1]) == 412:
        return 412
      del bucket.objects[name]
    return 204

  def _batch(self, body: bytes, content_type: str):
    boundary = re.search(r'boundary="?([^";]+)"?', content_type)[1]
    answers = []
    for part in body.decode().split("--" + boundary)[1:]:
      request = re.search(r"(DELETE|GET) (\S+) HTTP", part)
      if not request:
        continue
      url = urllib.parse.urlsplit(request[2])
      query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
      status = self._delete(url.path, query) if request[1] == "DELETE" else 400
      reason = {204: "No Content", 404: "Not Found", 412: "Precondition Failed"}.get(status, "")
      answers.append(f"Content-Type: application/http\r\n\r\nHTTP/1.1 {status} {reason}\r\n"
                     f"Content-Length: 0\r\n\r\n")
    out = "".join(f"--batch_out\r\n{a}" for a in answers) + "--batch_out--\r\n"
    self._reply(200, out.encode(), "multipart/mixed; boundary=batch_out")


def _split_multipart(body: bytes, content_type: str) -> tuple[dict, bytes]:
  """A multipart/related upload -> (its JSON metadata, its data)."""
  boundary = re.search(r'boundary="?([^";]+)"?', content_type)[1].encode()
  parts = body.split(b"--" + boundary)
  metadata_part, data_part = parts[1], parts[2]

  def payload(part: bytes) -> bytes:
    for separator in (b"\r\n\r\n", b"\n\n"):
      if separator in part:
        return part.split(separator, 1)[1]
    return part

  data = payload(data_part)
  for ending in (b"\r\n", b"\n"):  # the line break before the closing boundary
    if data.endswith(ending):
      data = data[:-len(ending)]
      break
  return json.loads(payload(metadata_part).strip() or b"{}"), data


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def __init__(self, address, buckets: list[str]):
    super().__init__(address, _Handler)
    self.buckets = {name: Bucket(name) for name in buckets}
    self.uploads: dict[str, tuple] = {}


class Emulator:
  """The server on 127.0.0.1 (a free port) in a background thread; `close()` stops it."""

  def __init__(self, buckets: tuple[str, ...] = ("bucket",)):
    self._server = _Server(("127.0.0.1", 0), list(buckets))
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
    self._thread.start()

  def bucket(self, name: str = "bucket") -> Bucket:
    return self._server.buckets[name]

  def environment(self) -> dict[str, str]:
    """The variables that point tensorstore and etils.epath (via gcsfs) at this server."""
    return {"TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
            "STORAGE_EMULATOR_HOST": self.url, "EPATH_USE_TF": "false",
            "GOOGLE_CLOUD_PROJECT": "test",
            # gcsfs's zonal-bucket probe needs real credentials; off against the emulator.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

  def close(self):
    self._server.shutdown()
    self._server.server_close()


if __name__ == "__main__":  # a standalone server: python tests/gcs_emulator.py
  emulator = Emulator()
  print(emulator.url, flush=True)
  threading.Event().wait()
