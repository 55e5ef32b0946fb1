# An independent reading of docs/backup-format.md (Python, cryptography): decrypts its test vector.
import hashlib, struct, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
hexs = open(sys.argv[1]).read().split('```')[1].strip()
b = bytes.fromhex(hexs)
assert b[:4] == b'CFBK' and b[4] == 1
flags = b[5]; chunk = struct.unpack('>I', b[6:10])[0]; n = b[10]; bid = b[11:11+n]; p = 11+n
m = b[p]; kid = b[p+1:p+1+m]; p = p+1+m
wn = b[p:p+12]; wk = b[p+12:p+44]; wt = b[p+44:p+60]; p += 60
hdr = b[:p]; H = hashlib.sha256(hdr).digest()
aad = b'CFBK1-key' + bytes([len(bid)]) + bid + bytes([len(kid)]) + kid
dk = AESGCM(bytes([1]*32)).decrypt(wn, wk + wt, aad)
assert dk == bytes([2]*32)
out = b''; i = 0
while True:
    raw = struct.unpack('>I', b[p:p+4])[0]; p += 4
    final = raw >> 31; L = raw & 0x7fffffff
    ct = b[p:p+L]; tag = b[p+L:p+L+16]; p += L + 16
    nonce = b'\0'*4 + struct.pack('>Q', i)
    out += AESGCM(dk).decrypt(nonce, ct + tag, H + struct.pack('>Q', i) + bytes([final]))
    i += 1
    if final: break
assert p == len(b)
print(out.decode(), hashlib.sha256(b).hexdigest(), 11 + n + 1 + m + 60 + 2 * 36)
