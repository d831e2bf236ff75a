"""Bounded load for bench/tokenizer-memory.sh: N chat requests to MODEL over C keep-alive connections, with varied multilingual text. Usage: tokenizer_load.py PORT MODEL N C [stream]"""
import http.client, json, os, random, sys, threading, time
port, model, n, conns = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
stream = len(sys.argv) > 5 and sys.argv[5] == "stream"
KEY = os.environ["BENCH_KEY"]  # bench/lib.sh's, exported by bench/tokenizer-memory.sh
base = [
 "Hello, world! How's it going? I'd say we'll see.", "THE QUICK brown Fox's JUMPS; 1234567 + 89 = 1234656.",
 "  leading and   inner   spaces \n\n\ttabs\r\n and \u00a0nbsp   ", "fn main() {\n    println!(\"{}\", x[0] /* c */ >> 2);\n}\n",
 "Ceci n'est pas une pipe. \u00dcber stra\u00dfe na\u00efve caf\u00e9 \u2014 \u00abquotes\u00bb \u2026",
 "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3068\u4e2d\u6587\u5b57\u7b26\uff0c\ud55c\uad6d\uc5b4 \ubb38\uc7a5\uc785\ub2c8\ub2e4.",
 "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5 \u039a\u03cc\u03c3\u03bc\u03b5! \u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645 \u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
 "emoji \U0001f44b\U0001f3fd family \U0001f468\u200d\U0001f469\u200d\U0001f467 flags \U0001f1eb\U0001f1f7 and e\u0301 combining",
 "https://example.com/path?query=1&x=y#frag user@example.org", "0x7fffffff 3.14159e-10 1,000,000 12:30:45 2026-12-07",
 "The committee reviewed the proposal in detail and, after a long discussion about costs, timelines and risks, agreed to proceed.",
 "def f(x):\n    return {'a': [1, 2, 3], 'b': x ** 2}\n\nprint(f(10))\n",
]
chars = list("".join(base))
rng = random.Random(7)
def prompt():
    parts = [rng.choice(base) for _ in range(rng.randint(1, 6))]
    if rng.random() < 0.3:
        parts.append("".join(rng.choice(chars) for _ in range(rng.randint(10, 200))))
    return " ".join(parts)
bodies = [json.dumps({"model": model, "stream": stream, "messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": prompt()}]}) for _ in range(n)]
errors = [0]; done = [0]
def worker(i):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for b in bodies[i::conns]:
        try:
            c.request("POST", "/v1/chat/completions", b, {"Authorization": "Bearer " + KEY, "Content-Type": "application/json"})
            r = c.getresponse(); r.read()
            if r.status != 200: errors[0] += 1
            done[0] += 1
        except Exception as e:
            errors[0] += 1; c.close(); c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
t = time.time()
ts = [threading.Thread(target=worker, args=(i,)) for i in range(conns)]
[x.start() for x in ts]; [x.join(timeout=120) for x in ts]
print(f"{model}: {done[0]} done, {errors[0]} errors, {time.time()-t:.1f}s", file=sys.stderr)
