// Generic Verilator harness for an Amaranth top with the accelerator's port style:
// clk/rst, host-driven input streams (start, load, rd_addr ...), host-consumed output streams (rd_data),
// external-memory read ports (ReadPortSignature), scalar outputs (done, busy, counters) and monitor
// probes (streams observed at handshake, pulses observed when non-zero).
//
// The design-specific part (port names, widths, payload field offsets) is in "vsim_ports.h", which
// sim/verilator/model.py generates from the component's signature. This file holds everything that
// runs per cycle: the external-memory model (a C++ port of sim/ext_memory.py with the same cycle
// semantics), the host driver that executes a job (a list of put/get/wait/sample operations), and
// the monitors. Python writes the job file, runs this program once, and reads the result file.
//
// Usage: vsim JOB RESULT [TRACE_FILE TRACE_FROM TRACE_TO]
// Exit codes: 0 ok, 2 bad job file, 3 memory protocol error, 4 timeout.  Errors: one line on stderr.
// Progress: with VSIM_PROGRESS_SECONDS=S (> 0) in the environment, a line "vsim-progress CYCLE SECONDS"
// goes to stderr about every S seconds of the clock loop (long runs: a W2 frame is tens of millions of
// cycles); the wall clock is read only every 65,536 cycles, so the loop's speed is unchanged.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <chrono>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "verilated.h"
#include "vsim_ports.h"

#if VM_TRACE_FST
#include "verilated_fst_c.h"
typedef VerilatedFstC TraceFile;
#elif VM_TRACE
#include "verilated_vcd_c.h"
typedef VerilatedVcdC TraceFile;
#endif

// ---- job / result encoding (mirrored in sim/verilator/model.py) --------------------------------
enum Op : uint32_t {
    OP_MEM = 1,     // port, bpc(f64), latency, max_outstanding, stall_prob(f64), seed, base(u64), nbytes, bytes...
    OP_HOST = 2,    // stall_prob(f64), seed
    OP_PUT = 3,     // stream, n, payload words (n * IN_WORDS[stream])
    OP_GET = 4,     // stream, n
    OP_XFER = 5,    // in stream, out stream, n, payload words: put n beats and get n beats concurrently
    OP_WAIT = 6,    // scalar, timeout: tick until scalar != 0, then one more cycle
    OP_TICK = 7,    // n
    OP_SAMPLE = 8,  // record every scalar
    OP_MARK = 9,    // record the cycle
    OP_WMEM = 10,   // wport, share (read port or ~0), bpc(f64, 0 = unlimited), latency, stall_prob(f64),
                    // seed, base(u64), nbytes(u64): configures a write port (after the OP_MEMs)
};
enum Rec : uint32_t {
    R_GET = 1,      // stream, n, words
    R_SAMPLE = 2,   // cycle, words of every scalar
    R_MARK = 3,     // cycle
    R_MON = 4,      // monitor, cycle, payload words
    R_PULSE = 5,    // pulse, cycle
    R_MEM = 6,      // port, bytes(u64), beats(u64), requests(u64)
    R_END = 7,      // cycles(u64), wall ns(u64)
    R_WMEM = 8,     // wport, bytes(u64), beats(u64), requests(u64), base(u64), nbytes(u64), bytes...
};

static void die(int code, const std::string& msg) {
    fprintf(stderr, "vsim: %s\n", msg.c_str());
    exit(code);
}

// A small, fast, seeded generator (splitmix64); stall draws are uniform doubles in [0, 1).
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed = 0) : s(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) {}
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }
};

static uint64_t get_bits(const uint32_t* w, unsigned lo, unsigned width) {
    uint64_t v = 0;
    for (unsigned i = 0; i < width; i++) {
        unsigned b = lo + i;
        v |= uint64_t((w[b / 32] >> (b % 32)) & 1u) << i;
    }
    return v;
}

struct Results {
    std::vector<uint32_t> words;
    void rec(uint32_t tag, const std::vector<uint32_t>& body) {
        words.push_back(tag);
        words.push_back((uint32_t)body.size());
        words.insert(words.end(), body.begin(), body.end());
    }
};

static void push64(std::vector<uint32_t>& v, uint64_t x) {
    v.push_back((uint32_t)x);
    v.push_back((uint32_t)(x >> 32));
}

// ---- external memory: same timing model as sim/ext_memory.py --------------------------------------
struct Memory {
    int port = 0;
    bool configured = false;
    double bpc = 16.0, stall_prob = 0.0, credit = 0.0;
    uint64_t latency = 1, max_outstanding = 4, base = 0;
    std::vector<uint8_t> data;
    Rng rng;
    struct Pending { uint64_t addr, left, beats, ready_cycle; };
    std::deque<Pending> pending;
    bool beat = false, req_ready = false, held = false;
    uint64_t held_addr = 0, held_beats = 0;
    uint64_t bytes_served = 0, beats_served = 0, request_count = 0;
    // sampled before the edge
    bool s_req_valid = false, s_resp_ready = false;
    uint64_t s_addr = 0, s_beats = 0;
    std::vector<uint32_t> req_w, resp_w;

    void init(Vtop* t) {
        credit = double(MEM_DATA_BYTES[port]);
        req_w.assign(MEM_REQ_WORDS[port], 0);
        resp_w.assign(MEM_RESP_WORDS[port], 0);
        mem_req_set_ready(t, port, 0);
        mem_resp_set_valid(t, port, 0);
    }
    void sample(Vtop* t) {
        s_req_valid = mem_req_valid(t, port);
        s_resp_ready = mem_resp_ready(t, port);
        if (s_req_valid) {
            mem_req_payload(t, port, req_w.data());
            s_addr = get_bits(req_w.data(), 0, MEM_ADDR_BITS[port]);
            s_beats = get_bits(req_w.data(), MEM_ADDR_BITS[port], MEM_BEATS_BITS[port]);
        }
    }
    void check(uint64_t c, uint64_t addr, uint64_t beats) {
        const uint64_t db = MEM_DATA_BYTES[port];
        char buf[256];
        if (addr % db) {
            snprintf(buf, sizeof buf, "ext_memory: request addr %#llx not aligned to %llu bytes",
                     (unsigned long long)addr, (unsigned long long)db);
            die(3, buf);
        }
        if (beats < 1 || beats > (uint64_t)MEM_MAX_BURST[port]) {
            snprintf(buf, sizeof buf, "ext_memory: request at %#llx has beats=%llu, allowed 1..%d",
                     (unsigned long long)addr, (unsigned long long)beats, MEM_MAX_BURST[port]);
            die(3, buf);
        }
        uint64_t end = addr + beats * db;
        if (addr / 4096 != (end - 1) / 4096) {
            snprintf(buf, sizeof buf, "ext_memory: burst %#llx+%llux%llu crosses a 4096-byte boundary",
                     (unsigned long long)addr, (unsigned long long)beats, (unsigned long long)db);
            die(3, buf);
        }
        if (addr < base || end > base + data.size()) {
            snprintf(buf, sizeof buf, "ext_memory: cycle %llu: burst %#llx..%#llx outside backing store "
                     "%#llx..%#llx", (unsigned long long)c, (unsigned long long)addr,
                     (unsigned long long)end, (unsigned long long)base,
                     (unsigned long long)(base + data.size()));
            die(3, buf);
        }
    }
    // After the edge that ended cycle c: book the transfers, then drive cycle c + 1.
    void update(Vtop* t, uint64_t c) {
        const uint64_t db = MEM_DATA_BYTES[port];
        if (held && (!s_req_valid || s_addr != held_addr || s_beats != held_beats)) {
            char buf[160];
            snprintf(buf, sizeof buf, "ext_memory: cycle %llu: request (%#llx, %llu) was withdrawn or "
                     "changed before it was accepted", (unsigned long long)c,
                     (unsigned long long)held_addr, (unsigned long long)held_beats);
            die(3, buf);
        }
        held = false;
        if (s_req_valid && req_ready) {
            check(c, s_addr, s_beats);
            request_count++;
            pending.push_back({s_addr, s_beats, s_beats, c + latency});
        } else if (s_req_valid) {
            held = true;
            held_addr = s_addr;
            held_beats = s_beats;
        }
        if (beat && s_resp_ready) {
            bytes_served += db;
            beats_served++;
            beat = false;
        }
        c += 1;
        credit += bpc;
        bool stall = stall_prob != 0.0 && rng.uniform() < stall_prob;
        if (!beat && !stall && !pending.empty() && pending.front().ready_cycle <= c && credit >= double(db)) {
            Pending& p = pending.front();
            std::fill(resp_w.begin(), resp_w.end(), 0u);
            const uint8_t* src = data.data() + (p.addr - base);
            for (uint64_t i = 0; i < db; i++) resp_w[i / 4] |= uint32_t(src[i]) << (8 * (i % 4));
            bool last = p.left == 1;
            unsigned lb = 8 * db;
            if (last) resp_w[lb / 32] |= 1u << (lb % 32);
            beat = true;
            p.addr += db;
            if (--p.left == 0) pending.pop_front();
            credit -= double(db);
            mem_resp_set_payload(t, port, resp_w.data());
        }
        if (credit > double(db)) credit = double(db);
        mem_resp_set_valid(t, port, beat);
        req_ready = !stall && pending.size() < max_outstanding;
        mem_req_set_ready(t, port, req_ready);
    }
};

// ---- external-memory write port: sim/ext_memory.py's serve_write, plus a read-side token bucket -----
// One burst open at a time: req.ready while none is; its data beats are taken (data.ready) unless a
// stall is drawn or, with a bandwidth limit, the bucket holds less than a beat; the response comes
// `latency` cycles after the last beat. Bytes go to a store of its own or to a read port's store.
struct WMemory {
    int port = 0;
    double bpc = 0.0, stall_prob = 0.0, credit = 0.0;     // bpc 0: unlimited
    uint64_t latency = 2, base = 0;
    std::vector<uint8_t> own;
    std::vector<uint8_t>* data = &own;
    Rng rng;
    bool open = false, req_ready = false, data_ready = false, resp_valid = false;
    uint64_t addr = 0, left = 0;
    std::deque<uint64_t> resp_due;
    uint64_t bytes_written = 0, beats = 0, request_count = 0;
    bool s_req_valid = false, s_data_valid = false, s_resp_ready = false;
    uint64_t s_addr = 0, s_beats = 0;
    std::vector<uint32_t> req_w, data_w;

    void init(Vtop* t) {
        credit = double(WMEM_DATA_BYTES[port]);
        req_w.assign(WMEM_REQ_WORDS[port], 0);
        data_w.assign(WMEM_DATA_WORDS[port], 0);
        req_ready = true;
        wmem_req_set_ready(t, port, 1);
        wmem_data_set_ready(t, port, 0);
        wmem_resp_set_valid(t, port, 0);
        wmem_resp_set_payload(t, port, 0);
    }
    void sample(Vtop* t) {
        s_req_valid = wmem_req_valid(t, port);
        s_data_valid = wmem_data_valid(t, port);
        s_resp_ready = wmem_resp_ready(t, port);
        if (s_req_valid) {
            wmem_req_payload(t, port, req_w.data());
            s_addr = get_bits(req_w.data(), 0, WMEM_ADDR_BITS[port]);
            s_beats = get_bits(req_w.data(), WMEM_ADDR_BITS[port], WMEM_BEATS_BITS[port]);
        }
        if (s_data_valid) wmem_data_payload(t, port, data_w.data());
    }
    void check(uint64_t c, uint64_t a, uint64_t n) {
        const uint64_t db = WMEM_DATA_BYTES[port];
        char buf[256];
        uint64_t end = a + n * db;
        const char* why = nullptr;
        if (a % db) why = "not aligned to the beat";
        else if (n < 1 || n > (uint64_t)WMEM_MAX_BURST[port]) why = "beats outside 1..max_burst";
        else if (a / 4096 != (end - 1) / 4096) why = "crosses a 4096-byte boundary";
        else if (a < base || end > base + data->size()) why = "outside backing store";
        if (why) {
            snprintf(buf, sizeof buf, "ext_memory: cycle %llu: write burst %#llx x %llu beats %s "
                     "(store %#llx..%#llx)", (unsigned long long)c, (unsigned long long)a,
                     (unsigned long long)n, why, (unsigned long long)base,
                     (unsigned long long)(base + data->size()));
            die(3, buf);
        }
    }
    // After the edge that ended cycle c (the pysim model's "cycle += 1" is c + 1 here).
    void update(Vtop* t, uint64_t c) {
        const uint64_t db = WMEM_DATA_BYTES[port];
        uint64_t now = c + 1;
        if (resp_valid && s_resp_ready) {
            resp_due.pop_front();
            resp_valid = false;
        }
        if (s_req_valid && req_ready) {
            check(c, s_addr, s_beats);
            request_count++;
            open = true;
            addr = s_addr;
            left = s_beats;
        }
        if (s_data_valid && data_ready) {
            if (!open) die(3, "ext_memory: write data beat without an open request");
            uint64_t strb = get_bits(data_w.data(), 8 * db, db);
            for (uint64_t i = 0; i < db; i++) {
                if ((strb >> i) & 1) {
                    (*data)[addr - base + i] = (uint8_t)get_bits(data_w.data(), 8 * i, 8);
                    bytes_written++;
                }
            }
            beats++;
            addr += db;
            if (bpc != 0.0) credit -= double(db);
            if (--left == 0) {
                open = false;
                resp_due.push_back(now + latency);
            }
        }
        bool stall = stall_prob != 0.0 && rng.uniform() < stall_prob;
        if (bpc != 0.0) {
            credit += bpc;
            if (credit > double(db)) credit = double(db);
        }
        req_ready = !open;
        data_ready = open && !stall && (bpc == 0.0 || credit >= double(db));
        resp_valid = !resp_due.empty() && resp_due.front() <= now;
        wmem_req_set_ready(t, port, req_ready);
        wmem_data_set_ready(t, port, data_ready);
        wmem_resp_set_valid(t, port, resp_valid);
    }
};

// ---- the host: runs the job's operations in order -----------------------------------------------
struct Host {
    const std::vector<uint32_t>& job;
    size_t pc = 0;
    Results& res;
    double stall_prob = 0.0;
    Rng rng;
    bool finished = false;
    // the operation in progress
    uint32_t op = 0;
    int in_s = -1, out_s = -1;
    uint64_t n = 0, put_i = 0, get_i = 0, waited = 0, timeout = 0, wait_sc = 0, ticks = 0;
    const uint32_t* payloads = nullptr;
    bool offering = false, accepting = false;
    bool s_in_ready = false, s_out_valid = false;
    std::vector<uint32_t> got, tmp;

    Host(const std::vector<uint32_t>& j, Results& r) : job(j), res(r) {}

    uint32_t word() {
        if (pc >= job.size()) die(2, "job file truncated");
        return job[pc++];
    }
    bool draw_stall() { return stall_prob != 0.0 && rng.uniform() < stall_prob; }

    // Present beat put_i on in_s unless a stall is drawn for this cycle. A beat once presented stays
    // (valid and payload hold until the transfer: stream rules), so only an idle slot draws.
    void offer(Vtop* t) {
        if (offering) return;
        offering = put_i < n && !draw_stall();
        in_set_valid(t, in_s, offering);
        if (offering) in_set_payload(t, in_s, payloads + put_i * IN_WORDS[in_s]);
    }
    // Likewise ready, once raised, stays until a beat is taken (as sim/testbench.py's stream_get).
    void accept(Vtop* t) {
        if (accepting) return;
        accepting = get_i < n && !draw_stall();
        out_set_ready(t, out_s, accepting);
    }
    void sample(Vtop* t) {
        if (in_s >= 0) s_in_ready = in_get_ready(t, in_s);
        if (out_s >= 0) {
            s_out_valid = out_get_valid(t, out_s);
            if (accepting && s_out_valid) {
                tmp.resize(OUT_WORDS[out_s]);
                out_get_payload(t, out_s, tmp.data());
            }
        }
    }
    // Start operations until one needs clock cycles (called at time 0 and after every edge).
    void advance(Vtop* t, uint64_t cycle) {
        for (;;) {
            if (op != 0) return;
            if (pc >= job.size()) { finished = true; return; }
            uint32_t o = word();
            uint32_t len = word();
            size_t body = pc;
            switch (o) {
            case OP_HOST: {
                uint64_t lo = word(), hi = word();
                uint64_t bits = lo | (hi << 32);
                memcpy(&stall_prob, &bits, 8);
                rng = Rng(word());
                break;
            }
            case OP_PUT: case OP_XFER: {
                in_s = word();
                if (o == OP_XFER) out_s = word();
                n = word();
                if (in_s < 0 || in_s >= N_IN || (o == OP_XFER && (out_s < 0 || out_s >= N_OUT)))
                    die(2, "bad stream index in job");
                payloads = job.data() + pc;
                pc += n * IN_WORDS[in_s];
                put_i = get_i = 0;
                op = o;
                got.clear();
                offer(t);
                if (o == OP_XFER) accept(t);
                break;
            }
            case OP_GET: {
                out_s = word();
                n = word();
                if (out_s < 0 || out_s >= N_OUT) die(2, "bad stream index in job");
                get_i = 0;
                got.clear();
                op = o;
                accept(t);
                break;
            }
            case OP_WAIT:
                wait_sc = word();
                timeout = word();
                if (wait_sc >= (uint64_t)N_SC) die(2, "bad scalar index in job");
                waited = 0;
                op = o;
                break;
            case OP_TICK:
                ticks = word();
                if (ticks) op = o;
                break;
            case OP_SAMPLE: {
                t->eval();
                std::vector<uint32_t> v;
                push64(v, cycle);
                for (int i = 0; i < N_SC; i++) {
                    tmp.assign(SC_WORDS[i], 0);
                    sc_get(t, i, tmp.data());
                    v.insert(v.end(), tmp.begin(), tmp.end());
                }
                res.rec(R_SAMPLE, v);
                break;
            }
            case OP_MARK: {
                std::vector<uint32_t> v;
                push64(v, cycle);
                res.rec(R_MARK, v);
                break;
            }
            default:
                die(2, "unknown job operation " + std::to_string(o));
            }
            if (o != OP_PUT && o != OP_XFER) pc = body + len;
            if (op == OP_WAIT) {
                // Like the pysim runner: check the (settled) level now, and after every cycle.
                t->eval();
                if (sc_get_bool(t, wait_sc)) op = OP_TICK, ticks = 1;
            }
        }
    }
    void finish_get() {
        std::vector<uint32_t> v = {(uint32_t)out_s, (uint32_t)n};
        v.insert(v.end(), got.begin(), got.end());
        res.rec(R_GET, v);
    }
    // After the edge: book this op's transfers, drive the next cycle.
    void update(Vtop* t, uint64_t cycle) {
        switch (op) {
        case OP_PUT: case OP_XFER: case OP_GET: {
            if ((op == OP_PUT || op == OP_XFER) && offering && s_in_ready) {
                put_i++;
                offering = false;
            }
            if ((op == OP_GET || op == OP_XFER) && accepting && s_out_valid) {
                got.insert(got.end(), tmp.begin(), tmp.end());
                get_i++;
                accepting = false;
            }
            bool put_done = op == OP_GET || put_i == n;
            bool get_done = op == OP_PUT || get_i == n;
            if (op != OP_GET) offer(t);
            if (op != OP_PUT) accept(t);
            if (put_done && get_done) {
                if (op != OP_PUT) finish_get();
                if (in_s >= 0) in_set_valid(t, in_s, 0);
                if (out_s >= 0) out_set_ready(t, out_s, 0);
                op = 0;
                in_s = out_s = -1;
                offering = accepting = false;
            }
            break;
        }
        case OP_WAIT:
            t->eval();
            if (sc_get_bool(t, wait_sc)) {
                op = OP_TICK;
                ticks = 1;
            } else if (++waited > timeout) {
                die(4, "timeout: scalar " + std::string(SC_NAMES[wait_sc]) + " not set within " +
                       std::to_string(timeout) + " cycles");
            }
            break;
        case OP_TICK:
            if (--ticks == 0) op = 0;
            break;
        }
        advance(t, cycle);
    }
};

static std::vector<uint32_t> read_file(const char* path) {
    FILE* f = fopen(path, "rb");
    if (!f) die(2, std::string("cannot open job file ") + path);
    std::vector<uint32_t> v;
    uint32_t buf[4096];
    size_t k;
    while ((k = fread(buf, 4, 4096, f)) > 0) v.insert(v.end(), buf, buf + k);
    fclose(f);
    return v;
}

int main(int argc, char** argv) {
    if (argc != 3 && argc != 6) die(2, "usage: vsim JOB RESULT [TRACE_FILE FROM TO]");
    const std::unique_ptr<VerilatedContext> ctx{new VerilatedContext};
    ctx->commandArgs(1, argv);
    std::vector<uint32_t> job = read_file(argv[1]);
    Results res;
    std::unique_ptr<Vtop> top{new Vtop{ctx.get()}};

    // Memory configurations come first in the job.
    std::vector<Memory> mems(N_MEM);
    for (int i = 0; i < N_MEM; i++) mems[i].port = i;
    size_t pc = 0;
    while (pc + 1 < job.size() && job[pc] == OP_MEM) {
        uint32_t len = job[pc + 1];
        const uint32_t* b = job.data() + pc + 2;
        uint32_t port = b[0];
        if (port >= (uint32_t)N_MEM) die(2, "bad memory port index in job");
        Memory& m = mems[port];
        uint64_t x;
        x = b[1] | (uint64_t(b[2]) << 32); memcpy(&m.bpc, &x, 8);
        m.latency = b[3];
        m.max_outstanding = b[4];
        x = b[5] | (uint64_t(b[6]) << 32); memcpy(&m.stall_prob, &x, 8);
        m.rng = Rng(b[7]);
        m.base = b[8] | (uint64_t(b[9]) << 32);
        uint64_t nbytes = b[10] | (uint64_t(b[11]) << 32);
        m.data.assign((const uint8_t*)(b + 12), (const uint8_t*)(b + 12) + nbytes);
        m.configured = true;
        pc += 2 + len;
    }
    std::vector<WMemory> wmems(N_WMEM);
    for (int i = 0; i < N_WMEM; i++) {
        wmems[i].port = i;
        wmems[i].own.assign(0, 0);
    }
    while (pc + 1 < job.size() && job[pc] == OP_WMEM) {
        uint32_t len = job[pc + 1];
        const uint32_t* b = job.data() + pc + 2;
        uint32_t port = b[0];
        if (port >= (uint32_t)N_WMEM) die(2, "bad write port index in job");
        WMemory& w = wmems[port];
        uint32_t share = b[1];
        uint64_t x;
        x = b[2] | (uint64_t(b[3]) << 32); memcpy(&w.bpc, &x, 8);
        w.latency = b[4];
        x = b[5] | (uint64_t(b[6]) << 32); memcpy(&w.stall_prob, &x, 8);
        w.rng = Rng(b[7] + 1);
        w.base = b[8] | (uint64_t(b[9]) << 32);
        uint64_t nbytes = b[10] | (uint64_t(b[11]) << 32);
        if (share != 0xFFFFFFFFu) {
            if (share >= (uint32_t)N_MEM || !mems[share].configured) die(2, "write port shares an unconfigured read port");
            w.data = &mems[share].data;
            w.base = mems[share].base;
        } else {
            w.own.assign(nbytes, 0);
            w.data = &w.own;
        }
        pc += 2 + len;
    }
    std::vector<uint32_t> host_job(job.begin() + pc, job.end());
    job.clear();
    Host host(host_job, res);

#if VM_TRACE
    std::unique_ptr<TraceFile> tfp;
    uint64_t tr_from = 0, tr_to = 0;
    if (argc == 6) {
        ctx->traceEverOn(true);
        tfp.reset(new TraceFile);
        top->trace(tfp.get(), 99);
        tfp->open(argv[3]);
        tr_from = strtoull(argv[4], nullptr, 0);
        tr_to = strtoull(argv[5], nullptr, 0);
    }
#else
    if (argc == 6) die(2, "this model was built without tracing");
#endif

    top->clk = 0;
    top->rst = 0;
    for (auto& m : mems) m.init(top.get());
    for (auto& w : wmems) w.init(top.get());
    for (int i = 0; i < N_IN; i++) in_set_valid(top.get(), i, 0);
    for (int i = 0; i < N_OUT; i++) out_set_ready(top.get(), i, 0);
    top->eval();
    host.advance(top.get(), 0);
    top->eval();

    std::vector<uint32_t> mon_w;
    double progress_s = 0.0;
    if (const char* e = getenv("VSIM_PROGRESS_SECONDS")) progress_s = strtod(e, nullptr);
    auto t0 = std::chrono::steady_clock::now();
    double next_progress = progress_s;
    uint64_t cycle = 0;
    Vtop* t = top.get();
    while (!host.finished) {
        // Sample everything before the rising edge (inputs for this cycle are set and settled).
        for (auto& m : mems) m.sample(t);
        for (auto& w : wmems) w.sample(t);
        host.sample(t);
        for (int i = 0; i < N_MON; i++) {
            if (mon_fire(t, i)) {
                mon_w.assign(MON_WORDS[i], 0);
                mon_payload(t, i, mon_w.data());
                std::vector<uint32_t> v = {(uint32_t)i};
                push64(v, cycle);
                v.insert(v.end(), mon_w.begin(), mon_w.end());
                res.rec(R_MON, v);
            }
        }
        for (int i = 0; i < N_PULSE; i++) {
            if (pulse_get(t, i)) {
                std::vector<uint32_t> v = {(uint32_t)i};
                push64(v, cycle);
                res.rec(R_PULSE, v);
            }
        }
        t->clk = 1;
        t->eval();
#if VM_TRACE
        if (tfp && cycle >= tr_from && cycle <= tr_to) tfp->dump(2 * cycle + 1);
#endif
        for (auto& m : mems) m.update(t, cycle);
        for (auto& w : wmems) w.update(t, cycle);
        cycle++;
        if (progress_s > 0 && (cycle & 0xFFFF) == 0) {
            double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            if (s >= next_progress) {
                fprintf(stderr, "vsim-progress %llu %.3f\n", (unsigned long long)cycle, s);
                fflush(stderr);
                next_progress = s + progress_s;
            }
        }
        host.update(t, cycle);
        t->clk = 0;
        t->eval();
#if VM_TRACE
        if (tfp && cycle >= tr_from && cycle <= tr_to) tfp->dump(2 * cycle);
#endif
    }
    auto t1 = std::chrono::steady_clock::now();
#if VM_TRACE
    if (tfp) tfp->close();
#endif
    for (auto& m : mems) {
        std::vector<uint32_t> v = {(uint32_t)m.port};
        push64(v, m.bytes_served);
        push64(v, m.beats_served);
        push64(v, m.request_count);
        res.rec(R_MEM, v);
    }
    for (auto& w : wmems) {
        std::vector<uint32_t> v = {(uint32_t)w.port};
        push64(v, w.bytes_written);
        push64(v, w.beats);
        push64(v, w.request_count);
        push64(v, w.base);
        push64(v, w.data->size());
        std::vector<uint32_t> words((w.data->size() + 3) / 4, 0u);
        if (!w.data->empty()) memcpy(words.data(), w.data->data(), w.data->size());
        v.insert(v.end(), words.begin(), words.end());
        res.rec(R_WMEM, v);
    }
    {
        std::vector<uint32_t> v;
        push64(v, cycle);
        push64(v, (uint64_t)std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count());
        res.rec(R_END, v);
    }
    top->final();
    FILE* f = fopen(argv[2], "wb");
    if (!f) die(2, std::string("cannot write result file ") + argv[2]);
    fwrite(res.words.data(), 4, res.words.size(), f);
    fclose(f);
    return 0;
}
