// CharRNN playground: pick a model, type a prime, stream the continuation.
//
// One request per generation: fetch() on POST generate/stream, whose server-sent events are
// parsed from the response body here. A rejected request answers with its JSON error before
// the stream opens, so the server's own message can be shown; Stop aborts the fetch, which
// closes the connection and frees the server's batch row within one step.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    form: $("controls"),
    model: $("model"),
    prime: $("prime"),
    primeCount: $("prime-count"),
    primeWarning: $("prime-warning"),
    temperature: $("temperature"),
    temperatureRange: $("temperature-range"),
    topP: $("top_p"),
    topPRange: $("top_p-range"),
    topK: $("top_k"),
    seed: $("seed"),
    length: $("max_new_chars"),
    apiKeyField: $("api-key-field"),
    apiKey: $("api-key"),
    generate: $("generate"),
    stop: $("stop"),
    error: $("error"),
    summary: $("model-summary"),
    state: $("state"),
    text: $("text"),
    primeEcho: $("prime-echo"),
    generated: $("generated"),
    placeholder: $("placeholder"),
    chars: $("stat-chars"),
    rate: $("stat-rate"),
    ttfc: $("stat-ttfc"),
    finish: $("stat-finish"),
    match: $("stat-match"),
    constraintKind: $("constraint-kind"),
    constraintExample: $("constraint-example"),
    constraint: $("constraint"),
    seedUsed: $("stat-seed"),
    reuseSeed: $("reuse-seed"),
    colour: $("colour"),
    scoreText: $("score-text"),
    score: $("score"),
    bpc: $("stat-bpc"),
    alts: $("alts"),
    legend: $("legend"),
  };
  const FIELDS = ["model", "prime", "temperature", "top_p", "top_k", "seed", "max_new_chars"];
  const KEY_STORE = "charrnn.apiKey";

  let info = null; // GET /info
  let vocab = new Set(); // the selected model's characters
  let run = null; // the generation in flight

  // -- helpers -----------------------------------------------------------------------------

  const fmtInt = (n) => Math.round(n).toLocaleString("en-US");
  const fmtRate = (n) => (n >= 100 ? fmtInt(n) : n.toFixed(1));

  /** A character as Python's repr() writes it, so it reads like the server's messages. */
  function pyRepr(ch) {
    const named = { "\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\" };
    if (named[ch]) return `'${named[ch]}'`;
    if (ch === "'") return `"'"`;
    const cp = ch.codePointAt(0);
    if (cp < 0x20 || (cp >= 0x7f && cp < 0xa0)) return `'\\x${cp.toString(16).padStart(2, "0")}'`;
    if (/^[\p{C}\p{Z}]$/u.test(ch) && ch !== " ") {
      const hex = cp.toString(16).padStart(cp > 0xffff ? 8 : 4, "0");
      return `'\\${cp > 0xffff ? "U" : "u"}${hex}'`;
    }
    return `'${ch}'`;
  }

  /** Each character missing from the vocabulary with its first position (in code points,
   * as the server counts them). */
  function unknownChars(text) {
    const seen = new Map();
    let pos = 0;
    for (const ch of text) {
      if (!vocab.has(ch) && !seen.has(ch)) seen.set(ch, pos);
      pos += 1;
    }
    return [...seen.entries()];
  }

  function selectedModel() {
    return info?.models.find((m) => m.name === ui.model.value) ?? null;
  }

  // -- state and messages --------------------------------------------------------------------

  const STATE_LABELS = {
    idle: "idle",
    connecting: "connecting…",
    streaming: "streaming",
    done: "done",
    stopped: "stopped",
    rejected: "rejected",
    error: "error",
    scoring: "scoring…",
    scored: "scored",
  };

  function setState(state) {
    ui.state.dataset.state = state;
    ui.state.textContent = STATE_LABELS[state] ?? state;
    ui.text.dataset.state = state;
    const busy = state === "connecting" || state === "streaming" || state === "scoring";
    ui.text.setAttribute("aria-busy", String(busy));
    ui.generate.disabled = busy || !info || info.models.length === 0;
    ui.stop.disabled = !busy || state === "scoring";
    ui.score.disabled = busy || !info;
  }

  function showError(message) {
    ui.error.hidden = false;
    ui.error.textContent = message;
  }

  // Errors about the model or the prime show under that box; those about the numbers share
  // one box under their grid, each line named after its label.
  const PARAM_LABELS = {
    temperature: "Temperature",
    top_p: "Top-p",
    top_k: "Top-k",
    seed: "Seed",
    max_new_chars: "Length",
  };
  const ERROR_BOXES = ["model-error", "prime-error", "params-error", "constraint-error"];

  function clearErrors() {
    ui.error.hidden = true;
    ui.error.textContent = "";
    for (const id of ERROR_BOXES) {
      $(id).hidden = true;
      $(id).replaceChildren();
    }
    for (const name of FIELDS) $(name)?.removeAttribute("aria-invalid");
  }

  function showFieldError(name, message) {
    const own = $(`${name}-error`);
    const box = own ?? (name in PARAM_LABELS ? $("params-error") : null);
    if (!box) return false;
    const line = document.createElement("div");
    line.textContent = own ? message : `${PARAM_LABELS[name]}: ${message}`;
    box.append(line);
    box.hidden = false;
    $(name)?.setAttribute("aria-invalid", "true");
    return true;
  }

  /** Show a non-2xx answer: FastAPI's {"detail": [...]} under the fields it names. */
  async function showHttpError(resp) {
    let body = null;
    try {
      body = await resp.json();
    } catch {
      body = null;
    }
    const detail = body?.detail;
    const general = [];
    if (Array.isArray(detail)) {
      for (const d of detail) {
        const loc = Array.isArray(d.loc) ? d.loc.filter((p) => p !== "body" && p !== "query") : [];
        const field = loc.length ? String(loc[0]) : "";
        const msg = String(d.msg ?? "invalid value");
        if (!showFieldError(field, msg)) general.push(field ? `${loc.join(".")}: ${msg}` : msg);
      }
    } else if (typeof detail === "string") {
      general.push(detail);
    } else {
      general.push(`The server answered ${resp.status} ${resp.statusText}.`);
    }
    if (resp.status === 401) {
      ui.apiKeyField.hidden = false;
      ui.apiKey.focus();
    }
    if (resp.status === 404) showFieldError("model", general.pop() ?? "unknown model");
    const retry = resp.headers.get("Retry-After");
    if (retry && (resp.status === 429 || resp.status === 503)) {
      general.push(`Try again in ${retry} s.`);
    }
    if (general.length) showError(general.join(" "));
  }

  // -- models and vocabulary -----------------------------------------------------------------

  async function loadInfo() {
    try {
      const resp = await fetch("info", { headers: { Accept: "application/json" } });
      if (!resp.ok) throw new Error(`GET /info answered ${resp.status}`);
      info = await resp.json();
    } catch (e) {
      ui.summary.textContent = `Cannot load the models (${e.message}); retrying…`;
      setTimeout(loadInfo, 2000);
      return;
    }
    if (info.models.length === 0) {
      ui.summary.textContent = "The server is still loading its models…";
      setTimeout(loadInfo, 1000);
      return;
    }
    ui.model.replaceChildren(
      ...info.models.map((m) => {
        const opt = new Option(m.name, m.name, m.default, m.default);
        return opt;
      })
    );
    ui.model.disabled = info.models.length < 2;
    const lim = info.limits;
    ui.length.max = String(lim.max_new_chars_limit);
    if (Number(ui.length.value) > lim.max_new_chars_limit) {
      ui.length.value = String(lim.max_new_chars_limit);
    }
    if (lim.auth_required) ui.apiKeyField.hidden = false;
    onModelChange();
    setState(ui.state.dataset.state || "idle");
  }

  function onModelChange() {
    const m = selectedModel();
    if (!m) return;
    vocab = new Set(Array.from(m.vocabulary));
    ui.topK.max = String(m.architecture.vocab_size);
    ui.topK.placeholder = `all ${m.architecture.vocab_size}`;
    const a = m.architecture;
    const parts = [
      `${a.cell.toUpperCase()} ${a.layers}×${a.hidden}`,
      `${fmtInt(m.parameters)} parameters`,
      `${a.vocab_size} characters`,
    ];
    const bpc = m.metrics?.best_val_bpc;
    if (typeof bpc === "number") parts.push(`${bpc.toFixed(2)} bits/char on validation`);
    parts.push(`${m.device}, ${m.dtype}`);
    ui.summary.textContent = `${m.name}: ${parts.join(" · ")}`;
    checkPrime();
  }

  /** Warn (without blocking: the server has the last word) about characters the model does
   * not know, and count the prime against the server's limit. */
  function checkPrime() {
    const text = ui.prime.value;
    const n = Array.from(text).length;
    const limit = info?.limits.max_prime_chars;
    ui.primeCount.textContent = limit ? `${fmtInt(n)} / ${fmtInt(limit)} chars` : `${fmtInt(n)} chars`;
    ui.primeCount.classList.toggle("over", Boolean(limit && n > limit));
    if (!info) return;
    const unknown = unknownChars(text);
    if (unknown.length === 0) {
      ui.primeWarning.hidden = true;
      ui.primeWarning.replaceChildren();
      return;
    }
    const name = ui.model.value;
    const items = unknown.map(([ch, pos]) => {
      const code = document.createElement("code");
      code.textContent = pyRepr(ch);
      const li = document.createElement("li");
      li.append(code, ` at position ${pos}`);
      return li;
    });
    const list = document.createElement("ul");
    list.append(...items);
    ui.primeWarning.replaceChildren(
      `Not in ${name}'s vocabulary (the server will refuse the prime):`,
      list
    );
    ui.primeWarning.hidden = false;
  }

  // -- generation ----------------------------------------------------------------------------

  /** A number box's value: undefined when empty (the server's default applies); anything
   * unparsable is sent as typed so that the server's message explains it. */
  function numberField(input) {
    const raw = input.value.trim();
    if (raw === "") return undefined;
    const n = Number(raw);
    return Number.isFinite(n) ? n : raw;
  }

  // Seeds go up to 2**63, past what a JS number holds exactly: they travel as digit strings
  // here and as JSON integers on the wire.
  const SEED_RE = /"seed"\s*:\s*(\d+)/;
  const seedOf = (json) => SEED_RE.exec(json)?.[1] ?? null;

  function toJSON(body) {
    const mark = (k, v) => (k === "seed" && typeof v === "string" ? `@seed:${v}@` : v);
    return JSON.stringify(body, mark).replace(/"seed":"@seed:(\d+)@"/, '"seed":$1');
  }

  function requestBody() {
    const body = { prime: ui.prime.value, model: ui.model.value || null };
    const fields = [
      ["temperature", ui.temperature],
      ["top_p", ui.topP],
      ["top_k", ui.topK],
      ["seed", ui.seed],
      ["max_new_chars", ui.length],
    ];
    for (const [name, input] of fields) {
      const v = numberField(input);
      if (v !== undefined) body[name] = v;
    }
    const seed = ui.seed.value.trim();
    if (/^\d+$/.test(seed)) body.seed = seed;
    if (ui.colour.checked) body.logprobs = 5;
    const constraint = constraintValue();
    if (constraint !== undefined) body.constraint = constraint;
    return body;
  }

  // -- constraints ---------------------------------------------------------------------------

  // Ready examples that the shipped prose model can write (a name, a line of a template, an
  // answer), with the prime that suits each.
  const CONSTRAINT_EXAMPLES = {
    name: { kind: "regex", text: "[A-Z][a-z]{3,9}(ia|or|wen)", prime: "Her name was " },
    template: { kind: "regex", text: "Alice (said|cried|whispered) [a-z ,]{10,60}\\.", prime: "\n" },
    yesno: { kind: "choice", text: "Yes\nNo", prime: "Do you like cats? " },
  };

  /** The request's constraint object (undefined: none). Choices are one per line; a JSON
   * schema that is not JSON is sent as typed, so that the server's message explains it. */
  function constraintValue() {
    const kind = ui.constraintKind.value;
    const text = ui.constraint.value;
    if (!kind) return undefined;
    if (kind === "choice") return { choice: text.split("\n").filter((c) => c !== "") };
    if (kind === "json_schema") {
      try {
        return { json_schema: JSON.parse(text) };
      } catch {
        return { json_schema: text };
      }
    }
    return { [kind]: text };
  }

  function setUpConstraints() {
    const sync = () => {
      ui.constraint.disabled = !ui.constraintKind.value;
    };
    ui.constraintKind.addEventListener("change", sync);
    ui.constraintExample.addEventListener("change", () => {
      const example = CONSTRAINT_EXAMPLES[ui.constraintExample.value];
      ui.constraintExample.value = "";
      if (!example) return;
      ui.constraintKind.value = example.kind;
      ui.constraint.value = example.text;
      ui.prime.value = example.prime;
      sync();
    });
    sync();
  }

  // -- probabilities ------------------------------------------------------------------------
  //
  // A coloured character is a <span class="tok sN"> whose shade N (0-5, one hue, light to
  // dark) is its surprisal in whole bits, capped: -log2 p. Its logprob and alternatives stay
  // in `shown` (by data-i), so hovering or focusing it shows them. Spans are made a frame's
  // worth at a time in a fragment, so colouring keeps up with a stream at full speed.

  const LN2 = Math.log(2);
  let shown = []; // [{text, logprob, top}] of the coloured characters on screen
  let shownModel = null; // the model whose text is on screen

  function shade(logprob) {
    if (logprob === null || logprob === undefined) return "none";
    return `s${Math.min(5, Math.floor(-logprob / LN2))}`;
  }

  function tokenSpans(tokens) {
    const frag = document.createDocumentFragment();
    for (const t of tokens) {
      const span = document.createElement("span");
      span.className = `tok ${shade(t.logprob)}`;
      span.dataset.i = String(shown.length);
      span.tabIndex = -1;
      span.textContent = t.text;
      shown.push(t);
      frag.appendChild(span);
    }
    return frag;
  }

  const pct = (logprob) => {
    const p = Math.exp(logprob) * 100;
    return p >= 10 ? `${p.toFixed(0)}%` : p >= 0.1 ? `${p.toFixed(1)}%` : "<0.1%";
  };

  function showAlts(span) {
    const t = shown[Number(span.dataset.i)];
    if (!t) return;
    const rows = [];
    const head = t.logprob === null || t.logprob === undefined
      ? `${pyRepr(t.text)}: first character, nothing to condition on`
      : `${pyRepr(t.text)}: ${pct(t.logprob)} (${(-t.logprob / LN2).toFixed(2)} bits)`;
    for (const alt of t.top ?? []) {
      const mark = alt.text === t.text ? " ←" : "";
      rows.push(`<li><code>${escapeHTML(pyRepr(alt.text))}</code> ${pct(alt.logprob)}${mark}</li>`);
    }
    ui.alts.innerHTML = `<p>${escapeHTML(head)}</p>${rows.length ? `<ol>${rows.join("")}</ol>` : ""}`;
    ui.alts.hidden = false;
    const box = ui.text.getBoundingClientRect();
    const r = span.getBoundingClientRect();
    const host = ui.alts.offsetParent?.getBoundingClientRect() ?? box;
    ui.alts.style.left = `${Math.max(0, r.left - host.left)}px`;
    ui.alts.style.top = `${r.bottom - host.top + 4}px`;
  }

  function hideAlts() {
    ui.alts.hidden = true;
  }

  function escapeHTML(s) {
    return s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
  }

  /** Arrow keys move among the coloured characters of the output (a roving focus). */
  function onOutputKey(e) {
    const spans = ui.generated.querySelectorAll(".tok");
    if (!spans.length) return;
    const current = document.activeElement?.classList?.contains("tok") ? document.activeElement : null;
    let i = current ? Number(current.dataset.i) : -1;
    if (e.key === "ArrowRight") i = Math.min(spans.length - 1, i + 1);
    else if (e.key === "ArrowLeft") i = Math.max(0, i < 0 ? 0 : i - 1);
    else if (e.key === "Home") i = 0;
    else if (e.key === "End") i = spans.length - 1;
    else if (e.key === "Escape") {
      hideAlts();
      ui.text.focus();
      return;
    } else return;
    e.preventDefault();
    e.stopPropagation();
    spans[i].focus();
  }

  /** /score's logprobs as the characters tokenSpans() shades. */
  function tokensOf(lp) {
    return lp.tokens.map((t, i) => ({
      text: t,
      logprob: lp.token_logprobs[i],
      top: lp.top_logprobs[i],
    }));
  }

  function showBpc(data) {
    ui.bpc.textContent = data.bpc === null ? "–" : data.bpc.toFixed(3);
    ui.bpc.title = `nll ${data.nll?.toFixed(4)} nats/char, perplexity ${data.perplexity?.toFixed(3)}`;
  }

  async function scoreText() {
    if (run) return;
    clearErrors();
    const text = ui.scoreText.value;
    const body = { text, top_logprobs: 5, model: ui.model.value || null };
    const headers = { "Content-Type": "application/json" };
    const key = ui.apiKey.value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    resetOutput("");
    setState("scoring");
    let resp;
    try {
      resp = await fetch("score", { method: "POST", headers, body: JSON.stringify(body) });
    } catch (e) {
      showError(`Lost the connection to the server: ${e.message}`);
      setState("error");
      return;
    }
    if (!resp.ok) {
      await showHttpError(resp);
      setState("rejected");
      return;
    }
    const data = await resp.json();
    shownModel = body.model;
    ui.generated.replaceChildren(tokenSpans(tokensOf(data.logprobs)));
    ui.legend.hidden = false;
    ui.chars.textContent = fmtInt(data.chars);
    showBpc(data);
    ui.finish.textContent = "scored";
    setState("scored");
  }

  /** Colour the text already on screen (a generation made with the toggle off): /score it
   * with the prime as context, which gives exactly the logprobs the generation would have
   * carried, then shade it as a coloured run would have. */
  async function colourShown() {
    const text = ui.generated.textContent;
    if (run || !text || ui.generated.querySelector(".tok")) return;
    const before = ui.state.dataset.state;
    const body = {
      text,
      context: ui.primeEcho.textContent,
      top_logprobs: 5,
      model: shownModel,
    };
    const headers = { "Content-Type": "application/json" };
    const key = ui.apiKey.value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    clearErrors();
    setState("scoring");
    let resp;
    try {
      resp = await fetch("score", { method: "POST", headers, body: JSON.stringify(body) });
    } catch (e) {
      showError(`Could not colour the text: lost the connection to the server: ${e.message}`);
      setState(before);
      return;
    }
    if (!resp.ok) {
      await showHttpError(resp);
      setState(before);
      return;
    }
    const data = await resp.json();
    // The toggle may have been unticked, or the text replaced, while the answer travelled.
    if (ui.colour.checked && ui.generated.textContent === text) {
      shown = [];
      ui.generated.replaceChildren(tokenSpans(tokensOf(data.logprobs)));
      ui.legend.hidden = false;
      showBpc(data);
    }
    setState(before);
  }

  /** Unticking the toggle shows the same text plain again. */
  function uncolourShown() {
    if (run || !ui.generated.querySelector(".tok")) return;
    ui.generated.textContent = ui.generated.textContent;
    shown = [];
    hideAlts();
    ui.legend.hidden = true;
  }

  function resetOutput(prime) {
    shown = [];
    hideAlts();
    ui.legend.hidden = true;
    ui.bpc.textContent = "–";
    ui.bpc.title = "";
    ui.placeholder.hidden = true;
    ui.primeEcho.textContent = prime;
    ui.generated.textContent = "";
    ui.chars.textContent = "0";
    ui.rate.textContent = "–";
    ui.rate.title = "";
    ui.ttfc.textContent = "–";
    ui.finish.textContent = "–";
    ui.match.textContent = "–";
    ui.seedUsed.textContent = "–";
    ui.reuseSeed.hidden = true;
  }

  class Run {
    constructor(body) {
      this.body = body;
      this.controller = new AbortController();
      this.sent = performance.now();
      this.first = null; // time of the first character
      this.count = 0;
      this.pending = "";
      this.coloured = body.logprobs !== undefined;
      this.tokens = []; // coloured characters waiting for the next frame
      this.nats = 0; // their surprisal so far, for bits per character
      this.scored = 0;
      this.node = document.createTextNode("");
      this.flushQueued = false;
      this.lastRateAt = 0;
      this.finished = false;
      ui.generated.replaceChildren(this.node);
    }

    queue(text, payload) {
      if (this.coloured && payload) {
        this.tokens.push({ text, logprob: payload.logprob, top: payload.top_logprobs });
        this.nats -= payload.logprob;
        this.scored += 1;
      }
      if (this.first === null) {
        this.first = performance.now();
        ui.ttfc.textContent = `${fmtInt(this.first - this.sent)} ms`;
      }
      this.count += 1;
      this.pending += text;
      if (!this.flushQueued) {
        this.flushQueued = true;
        requestAnimationFrame(() => this.flush());
        setTimeout(() => this.flush(), 100); // rAF does not run in background tabs
      }
    }

    flush() {
      this.flushQueued = false;
      if (this.pending) {
        const box = ui.text;
        const follow = box.scrollHeight - box.scrollTop - box.clientHeight < 48;
        if (this.coloured) {
          ui.generated.appendChild(tokenSpans(this.tokens));
          this.tokens = [];
          if (this.scored) ui.bpc.textContent = (this.nats / this.scored / LN2).toFixed(3);
        } else {
          this.node.appendData(this.pending);
        }
        this.pending = "";
        if (follow) box.scrollTop = box.scrollHeight;
      }
      ui.chars.textContent = fmtInt(this.count);
      const now = performance.now();
      if (!this.finished && this.first !== null && now - this.lastRateAt > 200) {
        const secs = (now - this.first) / 1000;
        if (secs > 0.05) {
          this.lastRateAt = now;
          ui.rate.textContent = fmtRate(this.count / secs);
        }
      }
    }

    onStart(data, raw) {
      setState("streaming");
      ui.seedUsed.textContent = seedOf(raw) ?? String(data.seed);
    }

    onDone(data, raw) {
      this.finished = true;
      this.flush();
      const secs = this.first === null ? 0 : (performance.now() - this.first) / 1000;
      const seen = secs > 0 ? this.count / secs : 0;
      const server = data.timings?.chars_per_s;
      ui.rate.textContent = typeof server === "number" ? fmtRate(server) : fmtRate(seen);
      ui.rate.title =
        `measured by the server over ${data.timings?.generate_ms ?? "?"} ms; ` +
        `${fmtRate(seen)} chars/s arrived here`;
      ui.chars.textContent = fmtInt(data.usage?.generated_chars ?? this.count);
      ui.finish.textContent = data.finish_reason;
      ui.match.textContent = data.constraint
        ? data.constraint.matched
          ? "complete"
          : "incomplete"
        : "–";
      ui.seedUsed.textContent = seedOf(raw) ?? String(data.seed);
      ui.reuseSeed.hidden = false;
      setState("done");
    }

    onStreamError(data) {
      this.finished = true;
      this.flush();
      ui.finish.textContent = "error";
      showError(`Generation failed: ${data.message ?? "unknown error"} (${data.type ?? "error"})`);
      setState("error");
    }

    dispatch(type, data) {
      let payload;
      try {
        payload = JSON.parse(data);
      } catch {
        return;
      }
      if (type === "token") this.queue(payload.text, payload);
      else if (type === "start") this.onStart(payload, data);
      else if (type === "done") this.onDone(payload, data);
      else if (type === "error") this.onStreamError(payload);
    }

    /** Parse text/event-stream from the response body. */
    async read(resp) {
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      let type = "message";
      let data = [];
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        const lines = buf.split("\n");
        buf = lines.pop();
        for (let line of lines) {
          if (line.endsWith("\r")) line = line.slice(0, -1);
          if (line === "") {
            if (data.length) this.dispatch(type, data.join("\n"));
            type = "message";
            data = [];
          } else if (!line.startsWith(":")) {
            const i = line.indexOf(":");
            const field = i < 0 ? line : line.slice(0, i);
            let val = i < 0 ? "" : line.slice(i + 1);
            if (val.startsWith(" ")) val = val.slice(1);
            if (field === "event") type = val;
            else if (field === "data") data.push(val);
          }
        }
      }
    }

    async start() {
      const headers = { "Content-Type": "application/json", Accept: "text/event-stream" };
      const key = ui.apiKey.value.trim();
      if (key) headers.Authorization = `Bearer ${key}`;
      let resp;
      try {
        resp = await fetch("generate/stream", {
          method: "POST",
          headers,
          body: toJSON(this.body),
          signal: this.controller.signal,
          cache: "no-store",
        });
        if (!resp.ok) {
          await showHttpError(resp);
          this.finished = true;
          setState("rejected");
          return;
        }
        await this.read(resp);
        if (!this.finished) {
          this.finished = true;
          this.flush();
          showError("The stream ended before the server said it was done.");
          setState("error");
        }
      } catch (e) {
        this.finished = true;
        this.flush();
        if (this.controller.signal.aborted) {
          ui.finish.textContent = "stopped";
          setState("stopped");
        } else {
          showError(`Lost the connection to the server: ${e.message}`);
          setState("error");
        }
      } finally {
        if (run === this) run = null;
        // The toggle was ticked while this plain run streamed: colour what it left.
        if (ui.colour.checked && !this.coloured) colourShown();
      }
    }

    stop() {
      this.controller.abort();
    }
  }

  function generate() {
    if (run) return;
    clearErrors();
    const body = requestBody();
    resetOutput(body.prime);
    shownModel = body.model;
    setState("connecting");
    run = new Run(body);
    ui.legend.hidden = !run.coloured;
    run.start();
  }

  // -- wiring --------------------------------------------------------------------------------

  function pair(range, number) {
    range.addEventListener("input", () => {
      number.value = range.value;
    });
    number.addEventListener("input", () => {
      if (number.value !== "") range.value = number.value;
    });
  }

  function init() {
    pair(ui.temperatureRange, ui.temperature);
    pair(ui.topPRange, ui.topP);
    ui.form.addEventListener("submit", (e) => {
      e.preventDefault();
      generate();
    });
    ui.stop.addEventListener("click", () => run?.stop());
    setUpConstraints();
    ui.model.addEventListener("change", onModelChange);
    ui.prime.addEventListener("input", checkPrime);
    ui.prime.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        if (!ui.generate.disabled) generate();
      }
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && run) run.stop();
    });
    ui.score.addEventListener("click", scoreText);
    ui.colour.addEventListener("change", () => (ui.colour.checked ? colourShown() : uncolourShown()));
    ui.text.addEventListener("keydown", onOutputKey);
    for (const kind of ["mouseover", "focusin"]) {
      ui.text.addEventListener(kind, (e) => {
        if (e.target.classList?.contains("tok")) showAlts(e.target);
      });
    }
    ui.text.addEventListener("mouseleave", hideAlts);
    ui.text.addEventListener("focusout", (e) => {
      if (!ui.text.contains(e.relatedTarget)) hideAlts();
    });
    ui.reuseSeed.addEventListener("click", () => {
      ui.seed.value = ui.seedUsed.textContent;
      ui.seed.focus();
    });
    try {
      ui.apiKey.value = sessionStorage.getItem(KEY_STORE) ?? "";
      ui.apiKey.addEventListener("change", () => sessionStorage.setItem(KEY_STORE, ui.apiKey.value));
    } catch {
      // storage may be disabled; the key then lives only in the field
    }
    checkPrime();
    setState("idle");
    loadInfo();
  }

  init();
})();
