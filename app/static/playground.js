// CharRNN playground: pick a model, type a prime, stream the continuation.
//
// One request per generation: fetch() on POST generate/stream, whose server-sent events are
// parsed from the response body here. A rejected request answers with its JSON error before
// the stream opens, so the server's own message can be shown; Stop aborts the fetch, which
// closes the connection and frees the server's batch row within one step. With Samples above
// 1 the same request asks for n samples: every token event names its sample, and one done
// event closes them all.
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
    n: $("n"),
    samples: $("samples"),
    caret: $("caret"),
    more: $("more"),
    moreCount: $("more-count"),
    logitBias: $("logit_bias"),
  };
  // The "More controls" number boxes, each named (and its id) as the request's field.
  const CONTROL_NUMBERS = [
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "penalty_last_n",
    "dry_multiplier",
    "dry_base",
    "dry_allowed_length",
    "dry_penalty_last_n",
    "min_p",
    "typical_p",
  ];
  const CONTROL_LISTS = ["dry_sequence_breakers", "banned_strings"];
  const FIELDS = ["model", "prime", "temperature", "top_p", "top_k", "seed", "max_new_chars", "n"]
    .concat(CONTROL_NUMBERS, CONTROL_LISTS, ["logit_bias"]);
  const MAX_SAMPLES = 8;
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
    n: "Samples",
  };
  // Those about the more controls share one box at the foot of their group.
  const MORE_LABELS = {
    repetition_penalty: "Repetition penalty",
    presence_penalty: "Presence penalty",
    frequency_penalty: "Frequency penalty",
    penalty_last_n: "Penalty window",
    dry_multiplier: "DRY multiplier",
    dry_base: "DRY base",
    dry_allowed_length: "DRY allowed length",
    dry_penalty_last_n: "DRY window",
    dry_sequence_breakers: "DRY breakers",
    banned_strings: "Banned strings",
    min_p: "Min-p",
    typical_p: "Typical-p",
  };
  const ERROR_BOXES = [
    "model-error",
    "prime-error",
    "params-error",
    "constraint-error",
    "logit_bias-error",
    "more-error",
  ];

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
    const shared = name in PARAM_LABELS ? $("params-error") : name in MORE_LABELS ? $("more-error") : null;
    const box = own ?? shared;
    if (!box) return false;
    const line = document.createElement("div");
    line.textContent = own ? message : `${PARAM_LABELS[name] ?? MORE_LABELS[name]}: ${message}`;
    box.append(line);
    box.hidden = false;
    if (ui.more.contains(box)) ui.more.open = true; // a message in a closed group is unseen
    $(name)?.setAttribute("aria-invalid", "true");
    return true;
  }

  /** A value the page itself refuses before sending anything (the field and why). */
  class InputError extends Error {
    constructor(field, message) {
      super(message);
      this.field = field;
    }
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
        let msg = String(d.msg ?? "invalid value");
        // A problem with one entry of a list, or with a key of logit_bias, names it (unless
        // the server's message quotes the key already).
        const item = loc[1];
        if (typeof item === "number") msg = `line ${item + 1}: ${msg}`;
        else if (typeof item === "string" && !msg.includes(`'${item}'`) && !msg.includes(`"${item}"`)) {
          msg = `${JSON.stringify(item)}: ${msg}`;
        }
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
    // The more controls' defaults and bounds as the server has them.
    for (const c of lim.controls ?? []) {
      controlDefaults[c.name] = c.default;
      const input = CONTROL_NUMBERS.includes(c.name) ? $(c.name) : null;
      if (!input) continue;
      if (typeof c.minimum === "number" && !c.exclusive_minimum) input.min = String(c.minimum);
      if (typeof c.maximum === "number" && !c.exclusive_maximum) input.max = String(c.maximum);
    }
    ui.n.max = String(Math.min(MAX_SAMPLES, lim.max_n ?? MAX_SAMPLES));
    updateMoreCount();
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

  // -- more controls -------------------------------------------------------------------------

  const controlDefaults = {}; // /info's, by name; until it answers, the boxes' initial values
  const defaultOf = (name) =>
    name in controlDefaults
      ? controlDefaults[name]
      : name === "dry_sequence_breakers"
        ? ["\n"]
        : name === "banned_strings"
          ? []
          : Number($(name).defaultValue);

  /** One string per non-empty line; \n, \t and \\ stand for a newline, a tab and a backslash. */
  const ESCAPES = { n: "\n", t: "\t", "\\": "\\" };
  const linesOf = (text) =>
    text
      .split("\n")
      .filter((line) => line !== "")
      .map((line) => line.replace(/\\([nt\\])/g, (_, c) => ESCAPES[c]));

  const NUMBER_RE = /^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?/;
  const SEPARATOR_RE = /[\s,]/;

  /** "e=-2, x=5" as {e: -2, x: 5}: pairs of one character, "=" and a number, apart by commas
   * or spaces; a key that is a comma, a space or a quote is written as a JSON string
   * (" "=-3). A malformed pair throws an InputError that quotes it; the values' range and
   * the keys' vocabulary are the server's to check. */
  function parseLogitBias(text) {
    const out = {};
    let i = 0;
    const skip = () => {
      while (i < text.length && SEPARATOR_RE.test(text[i])) i += 1;
    };
    const fail = (start, why) => {
      const rest = text.slice(start);
      const pair = rest.split(/,|\s(?=\S+=)/)[0].trim() || rest.trim();
      throw new InputError("logit_bias", `"${pair}" is not a char=value pair: ${why}`);
    };
    skip();
    while (i < text.length) {
      const start = i;
      let key;
      if (text[i] === '"') {
        const quoted = /^"(?:[^"\\]|\\.)*"/.exec(text.slice(i));
        if (!quoted) fail(start, "the quote is not closed");
        try {
          key = JSON.parse(quoted[0]);
        } catch {
          fail(start, "the quoted key is not a JSON string");
        }
        i += quoted[0].length;
      } else {
        key = String.fromCodePoint(text.codePointAt(i));
        i += key.length;
      }
      while (text[i] === " ") i += 1;
      if (text[i] !== "=") fail(start, "one character, then =, then a number");
      i += 1;
      while (text[i] === " ") i += 1;
      const number = NUMBER_RE.exec(text.slice(i));
      if (!number) fail(start, "the value is not a number");
      i += number[0].length;
      if (i < text.length && !SEPARATOR_RE.test(text[i])) fail(start, "the value is not a number");
      if (Array.from(key).length !== 1) fail(start, "the key must be one character");
      if (Object.hasOwn(out, key)) fail(start, `${pyRepr(key)} is given twice`);
      out[key] = Number(number[0]);
      skip();
    }
    return out;
  }

  /** The more controls that differ from their defaults, as request fields. */
  function moreControls() {
    const out = {};
    for (const name of CONTROL_NUMBERS) {
      const v = numberField($(name));
      if (v !== undefined && v !== defaultOf(name)) out[name] = v;
    }
    for (const name of CONTROL_LISTS) {
      const v = linesOf($(name).value);
      if (JSON.stringify(v) !== JSON.stringify(defaultOf(name))) out[name] = v;
    }
    const bias = parseLogitBias(ui.logitBias.value);
    if (Object.keys(bias).length) out.logit_bias = bias;
    return out;
  }

  /** "(2 set)" beside the group's title, so that a closed group still says it is in use. */
  function updateMoreCount() {
    let text = "";
    try {
      const n = Object.keys(moreControls()).length;
      if (n) text = `(${n} set)`;
    } catch {
      text = "(a logit bias to fix)";
    }
    ui.moreCount.textContent = text;
  }

  /** Samples: a whole number from 1 to MAX_SAMPLES (or /info's max_n, if lower). */
  function samplesCount() {
    const raw = ui.n.value.trim();
    if (raw === "") return 1;
    const n = Number(raw);
    const most = Number(ui.n.max) || MAX_SAMPLES;
    if (!Number.isInteger(n) || n < 1 || n > most) {
      throw new InputError("n", `a whole number from 1 to ${most}`);
    }
    return n;
  }

  /** The request as the boxes say; an InputError where the page refuses to send it. */
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
    const n = samplesCount();
    if (n > 1) body.n = n;
    return Object.assign(body, moreControls());
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
    const spans = [...ui.text.querySelectorAll(".tok")];
    if (!spans.length) return;
    const current = document.activeElement?.classList?.contains("tok") ? document.activeElement : null;
    let i = current ? spans.indexOf(current) : -1;
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

  /** The elements that hold the generated text on screen: one, or one per sample. */
  function shownTexts() {
    return shownMany ? [...ui.samples.querySelectorAll(".sample-gen")] : [ui.generated];
  }

  /** Colour the text already on screen (a generation made with the toggle off): /score it
   * with the prime as context, which gives exactly the logprobs the generation would have
   * carried, then shade it as a coloured run would have; each sample likewise. */
  async function colourShown() {
    const els = shownTexts();
    const texts = els.map((el) => el.textContent);
    if (run || !texts.some(Boolean) || els.some((el) => el.querySelector(".tok"))) return;
    const before = ui.state.dataset.state;
    const headers = { "Content-Type": "application/json" };
    const key = ui.apiKey.value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    clearErrors();
    setState("scoring");
    const scored = [];
    for (const text of texts) {
      if (!text) {
        scored.push(null);
        continue;
      }
      const body = { text, context: ui.primeEcho.textContent, top_logprobs: 5, model: shownModel };
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
      scored.push(await resp.json());
    }
    // The toggle may have been unticked, or the text replaced, while the answers travelled.
    if (ui.colour.checked && els.every((el, k) => el.isConnected && el.textContent === texts[k])) {
      shown = [];
      els.forEach((el, k) => {
        if (scored[k]) el.replaceChildren(tokenSpans(tokensOf(scored[k].logprobs)));
      });
      ui.legend.hidden = false;
      const done = scored.filter(Boolean);
      if (done.length === 1) {
        showBpc(done[0]);
      } else {
        // Over all the samples: their bits weighed by the characters each scored.
        const chars = done.reduce((a, d) => a + (d.scored_chars ?? 0), 0);
        const bits = done.reduce((a, d) => a + (d.bpc ?? 0) * (d.scored_chars ?? 0), 0);
        ui.bpc.textContent = chars ? (bits / chars).toFixed(3) : "–";
        ui.bpc.title = "over every sample";
      }
    }
    setState(before);
  }

  /** Unticking the toggle shows the same text plain again. */
  function uncolourShown() {
    const els = shownTexts();
    if (run || !els.some((el) => el.querySelector(".tok"))) return;
    for (const el of els) el.textContent = el.textContent;
    shown = [];
    hideAlts();
    ui.legend.hidden = true;
  }

  let shownMany = false; // whether the output shows several samples

  function resetOutput(prime, n = 1) {
    shownMany = n > 1;
    ui.samples.hidden = !shownMany;
    ui.samples.replaceChildren();
    ui.caret.hidden = shownMany; // each sample has its own
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

  /** Where one sample's characters go: a text node while plain, shaded spans when coloured. */
  class Sink {
    constructor(el) {
      this.el = el;
      this.node = document.createTextNode("");
      this.pending = "";
      this.tokens = []; // coloured characters waiting for the next frame
      el.replaceChildren(this.node);
    }

    flush(coloured) {
      if (!this.pending) return;
      if (coloured) {
        this.el.appendChild(tokenSpans(this.tokens));
        this.tokens = [];
      } else {
        this.node.appendData(this.pending);
      }
      this.pending = "";
    }
  }

  const MAX_SEED = 2n ** 63n;

  /** Sample i's seed: the request's + i, modulo 2**63 (as the server seeds them). */
  const seedPlus = (seed, i) => ((BigInt(seed) + BigInt(i)) % MAX_SEED).toString();

  function part(className, text = "") {
    const span = document.createElement("span");
    span.className = className;
    span.textContent = text;
    return span;
  }

  /** One list entry per sample: its name, seed, finish and score above its text. */
  function sampleEntries(n) {
    const items = [];
    for (let i = 0; i < n; i++) {
      const li = document.createElement("li");
      li.className = "sample";
      li.dataset.sample = String(i);
      const head = document.createElement("div");
      head.className = "sample-head";
      head.append(
        part("sample-name", `Sample ${i + 1}`),
        part("sample-seed"),
        part("sample-finish"),
        part("sample-score")
      );
      const text = document.createElement("div");
      text.className = "sample-text";
      const caret = part("caret");
      caret.setAttribute("aria-hidden", "true");
      text.append(part("sample-gen"), caret);
      li.append(head, text);
      items.push(li);
    }
    ui.samples.replaceChildren(...items);
    return items;
  }

  class Run {
    constructor(body) {
      this.body = body;
      this.n = body.n ?? 1;
      this.controller = new AbortController();
      this.sent = performance.now();
      this.first = null; // time of the first character
      this.count = 0;
      this.coloured = body.logprobs !== undefined;
      this.nats = 0; // the coloured characters' surprisal so far, for bits per character
      this.scored = 0;
      this.entries = this.n > 1 ? sampleEntries(this.n) : [];
      this.sinks =
        this.n > 1
          ? this.entries.map((li) => new Sink(li.querySelector(".sample-gen")))
          : [new Sink(ui.generated)];
      this.flushQueued = false;
      this.lastRateAt = 0;
      this.finished = false;
    }

    queue(text, payload) {
      const sink = this.sinks[payload?.sample ?? 0];
      if (!sink) return;
      if (this.coloured && payload) {
        sink.tokens.push({ text, logprob: payload.logprob, top: payload.top_logprobs });
        this.nats -= payload.logprob;
        this.scored += 1;
      }
      if (this.first === null) {
        this.first = performance.now();
        ui.ttfc.textContent = `${fmtInt(this.first - this.sent)} ms`;
      }
      this.count += 1;
      sink.pending += text;
      if (!this.flushQueued) {
        this.flushQueued = true;
        requestAnimationFrame(() => this.flush());
        setTimeout(() => this.flush(), 100); // rAF does not run in background tabs
      }
    }

    flush() {
      this.flushQueued = false;
      const box = ui.text;
      // One text follows its end; several samples grow side by side and stay where they are.
      const follow = this.n === 1 && box.scrollHeight - box.scrollTop - box.clientHeight < 48;
      for (const sink of this.sinks) sink.flush(this.coloured);
      if (this.coloured && this.scored) ui.bpc.textContent = (this.nats / this.scored / LN2).toFixed(3);
      if (follow) box.scrollTop = box.scrollHeight;
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
      const seed = seedOf(raw) ?? String(data.seed);
      ui.seedUsed.textContent = seed;
      this.entries.forEach((li, i) => {
        li.querySelector(".sample-seed").textContent = `seed ${seedPlus(seed, i)}`;
      });
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
      if (this.n > 1) this.showSamples(data.samples ?? []);
      ui.seedUsed.textContent = seedOf(raw) ?? String(data.seed);
      ui.reuseSeed.hidden = false;
      setState("done");
    }

    /** The done event's samples: each entry's finish and score; the stats over them all. */
    showSamples(samples) {
      for (const s of samples) {
        const li = this.entries[s.index];
        if (!li) continue;
        li.classList.add("done");
        const matched = s.constraint ? (s.constraint.matched ? ", complete" : ", incomplete") : "";
        const finish = li.querySelector(".sample-finish");
        finish.textContent = `${s.finish_reason}${matched}`;
        finish.title = "why it ended (and whether it matched the constraint)";
        const score = li.querySelector(".sample-score");
        if (typeof s.score === "number") {
          score.textContent = `score ${s.score.toFixed(3)}`;
          score.title =
            `the mean logprob per character (nats): ${(-s.score / LN2).toFixed(3)} bits/char`;
        }
      }
      const reasons = new Set(samples.map((s) => s.finish_reason));
      if (reasons.size > 1) ui.finish.textContent = "mixed";
      const held = samples.filter((s) => s.constraint);
      if (held.length) {
        const k = held.filter((s) => s.constraint.matched).length;
        ui.match.textContent =
          k === held.length ? "complete" : k === 0 ? "incomplete" : `${k}/${held.length}`;
      }
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
    let body;
    try {
      body = requestBody();
    } catch (e) {
      if (!(e instanceof InputError)) throw e;
      showFieldError(e.field, e.message); // nothing is sent; the last output stays
      $(e.field)?.focus();
      return;
    }
    resetOutput(body.prime, body.n ?? 1);
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
    ui.more.addEventListener("input", updateMoreCount);
    ui.logitBias.addEventListener("change", () => {
      // A fixed (or emptied) pair clears its message at once; a new mistake waits for Generate.
      try {
        parseLogitBias(ui.logitBias.value);
        $("logit_bias-error").hidden = true;
        ui.logitBias.removeAttribute("aria-invalid");
      } catch {
        // shown when Generate is pressed
      }
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
    updateMoreCount();
    setState("idle");
    loadInfo();
  }

  init();
})();
