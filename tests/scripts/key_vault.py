# A Key Vault stand-in for the Azure SDK for Python: HTTPS on ADDRESS:443 with CERT/KEY, the
# bearer challenge Azure SDKs parse (resource on vault.azure.net), secrets set and read back,
# and RSA keys created and read. Only what the SDK's secret and key clients send; state in memory.
# Usage: python3 key_vault.py ADDRESS CERT KEY
import base64, http.server, json, re, ssl, sys, threading

secrets, keys, lock = {}, {}, threading.Lock()
CHALLENGE = ('Bearer authorization="https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000", '
             'resource="https://vault.azure.net"')

def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

class Vault(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, document=None, headers=()):
        body = json.dumps(document).encode() if document is not None else b""
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_request(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"null") if length else None
        if self.headers.get("Authorization") != "Bearer test-token":
            return self.answer(401, None, [("WWW-Authenticate", CHALLENGE)])
        host = self.headers.get("Host", "").split(":")[0]
        path = self.path.split("?")[0].rstrip("/")
        with lock:
            if m := re.fullmatch(r"/secrets/([\w-]+)(?:/[\w-]*)?", path):
                name = m.group(1)
                if self.command == "PUT":
                    secrets[name] = body["value"]
                if name not in secrets:
                    return self.answer(404, {"error": {"code": "SecretNotFound", "message": name}})
                return self.answer(200, {"value": secrets[name], "id": f"https://{host}/secrets/{name}/1",
                                         "attributes": {"enabled": True}})
            if m := re.fullmatch(r"/keys/([\w-]+)/create", path):
                name = m.group(1)
                keys[name] = {"kid": f"https://{host}/keys/{name}/1", "kty": body.get("kty", "RSA"),
                              "key_ops": ["wrapKey", "unwrapKey"], "n": b64url(bytes(range(1, 129))),
                              "e": b64url(b"\x01\x00\x01")}
            elif m := re.fullmatch(r"/keys/([\w-]+)(?:/[\w-]*)?", path):
                name = m.group(1)
            else:
                return self.answer(404, {"error": {"code": "NotFound", "message": path}})
            if name not in keys:
                return self.answer(404, {"error": {"code": "KeyNotFound", "message": name}})
            return self.answer(200, {"key": keys[name], "attributes": {"enabled": True}})

    do_GET = do_PUT = do_POST = handle_request

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer((sys.argv[1], 443), Vault)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print("vault ready", flush=True)
server.serve_forever()
