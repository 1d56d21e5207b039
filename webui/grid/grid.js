// Sieve's result grid (a Streamlit v2 component, no build step): dense thumbnails, a lightbox,
// multi-select and keyboard labelling (1 yes, 2 no, 3 skip), all drawn in the browser so a label costs no page rerun.
// State sent to Python: `labels` {key: [1|0|null, t]} (cumulative, newest wins);
// trigger `action` {kind: "subset" | "pos" | "neg", keys: [...], t}.
const SIZE_KEY = "sieve-grid-thumb";
const KEYS = "keys: ←/→ move · Enter open · 1 yes · 2 no · 3 skip · x select · Esc close";
const UP = "thumb_up";
const DOWN = "thumb_down";

// Material Symbols (the font Streamlit ships): a headless browser may have no emoji font
function icon(name) {
  return el("span", "sg-icon", name);
}

// a text with icons: parts are strings, or [name] for an icon
function rich(node, parts) {
  node.replaceChildren(...parts.map((p) => (Array.isArray(p) ? icon(p[0]) : p)));
  return node;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function typing(ev) {
  const path = ev.composedPath ? ev.composedPath() : [ev.target];
  return path.some(
    (n) => n && n.tagName && (/^(INPUT|TEXTAREA|SELECT)$/.test(n.tagName) || n.isContentEditable)
  );
}

export default function (component) {
  const { parentElement, setStateValue, setTriggerValue } = component;
  const data = typeof component.data === "string" ? JSON.parse(component.data) : component.data;
  const items = data.items || [];
  const sig = items.map((i) => i.key).join("\n") + "|" + data.mode + "|" + data.version;
  let s = parentElement.__sieve;
  if (!s || s.sig !== sig) {
    s = {
      sig,
      local: {}, // key -> [value, t]: labels given here, shown at once
      cursor: 0,
      selected: new Set(),
      open: false,
      times: [], // ms from a label key to the label drawn and the next card ready
      savedTimes: [], // ms from a label key to Python having written it (the "saved" status)
      lastKey: null,
    };
    parentElement.__sieve = s;
  }
  s.data = data;
  const server = data.labels || {};
  const label = (key) => (key in s.local ? s.local[key][0] : key in server ? server[key] : null);
  const saved = () =>
    Object.entries(s.local).every(([k, [v]]) => (v === null ? !(k in server) : server[k] === v));

  // ---- the DOM: built once per item list, updated in place afterwards --------------------------
  let root = parentElement.querySelector(".sg-root");
  if (!root || root.dataset.sig !== sig) {
    if (root) root.remove();
    root = el("div", "sg-root");
    root.dataset.sig = sig;
    root.tabIndex = 0;
    const bar = el("div", "sg-bar");
    const size = el("input", "sg-size");
    size.type = "range";
    size.min = "64";
    size.max = "320";
    size.step = "8";
    size.title = "thumbnail size";
    size.setAttribute("aria-label", "Thumbnail size");
    size.value = localStorage.getItem(SIZE_KEY) || String(data.size || 112);
    size.oninput = () => {
      localStorage.setItem(SIZE_KEY, size.value);
      root.style.setProperty("--thumb", size.value + "px");
    };
    root.style.setProperty("--thumb", size.value + "px");
    const sizeLabel = el("label", "sg-size-label", "Size ");
    sizeLabel.appendChild(size);
    bar.appendChild(sizeLabel);
    const count = el("span", "sg-count");
    bar.appendChild(count);
    const btn = (text, title, fn, cls) => {
      const b = el("button", "sg-btn " + (cls || ""));
      rich(b, Array.isArray(text) ? text : [text]);
      b.title = title;
      b.type = "button";
      b.onclick = (ev) => {
        ev.stopPropagation();
        fn();
      };
      bar.appendChild(b);
      return b;
    };
    btn("Select all", "select every result (x selects one)", () => {
      items.forEach((i) => s.selected.add(i.key));
      paint();
    });
    btn("Clear", "clear the selection", () => {
      s.selected.clear();
      paint();
    });
    const chosen = () => (s.selected.size ? [...s.selected] : [items[s.cursor].key]);
    const act = (kind) => setTriggerValue("action", { kind, keys: chosen(), t: Date.now() });
    if (data.mode === "label") {
      btn([[UP], " selected"], "label the selection as showing the concept", () => labelMany(1));
      btn([[DOWN], " selected"], "label the selection as not showing it", () => labelMany(0));
    } else {
      const hint = "add the selection to the concept's labels (Concepts page) as ";
      btn(["Use as ", [UP]], hint + "showing it", () => act("pos"));
      btn(["Use as ", [DOWN]], hint + "not showing it", () => act("neg"));
    }
    (data.extra || []).forEach(([kind, text]) => btn(text, text, () => act(kind)));
    btn("Send to Subset", "open these keys on the Subset page", () => act("subset"), "sg-primary");
    const status = el("span", "sg-status");
    bar.appendChild(status);
    root.appendChild(bar);
    root.appendChild(el("div", "sg-keys", KEYS));
    const grid = el("div", "sg-grid");
    items.forEach((it, i) => {
      const card = el("div", "sg-card");
      card.dataset.key = it.key;
      card.dataset.i = String(i);
      card.title = [it.caption, it.line].filter(Boolean).join("\n");
      const box = el("div", "sg-img");
      if (it.src) {
        const img = el("img");
        img.src = it.src;
        img.alt = it.caption || it.key;
        box.appendChild(img);
      } else {
        box.appendChild(el("span", "sg-noimg", "no image: " + (it.why || "")));
      }
      const tick = el("input", "sg-tick");
      tick.type = "checkbox";
      tick.title = "select (x)";
      tick.onclick = (ev) => {
        ev.stopPropagation();
        toggle(it.key);
      };
      box.appendChild(tick);
      box.appendChild(el("span", "sg-mark"));
      if (it.weak) box.appendChild(el("span", "sg-weak", "weak"));
      const hover = el("div", "sg-hover");
      hover.appendChild(el("div", "sg-hcap", it.caption || "(no caption)"));
      hover.appendChild(el("div", "sg-hline", it.line || ""));
      box.appendChild(hover);
      card.appendChild(box);
      card.appendChild(el("div", "sg-line", it.short || it.caption || it.key));
      card.onclick = (ev) => {
        s.cursor = i;
        if (ev.shiftKey || ev.ctrlKey || ev.metaKey) toggle(it.key);
        else openBox();
        activate();
        paint();
      };
      grid.appendChild(card);
    });
    root.appendChild(grid);
    const box = el("div", "sg-lightbox");
    box.setAttribute("role", "dialog");
    box.onclick = (ev) => {
      if (ev.target === box) closeBox();
    };
    root.appendChild(box);
    root.addEventListener("pointerdown", activate);
    parentElement.appendChild(root);
  }
  const cards = [...root.querySelectorAll(".sg-card")];
  const lightbox = root.querySelector(".sg-lightbox");

  function activate() {
    window.__sieveActiveGrid = parentElement;
  }
  if (data.mode === "label" && !window.__sieveActiveGrid?.isConnected) activate();

  function send() {
    setStateValue("labels", { ...s.local });
  }
  function setLabel(key, value) {
    const now = Date.now();
    const cur = label(key);
    s.local[key] = [cur === value ? null : value, now];
  }
  function labelMany(value) {
    const keys = s.selected.size ? [...s.selected] : [items[s.cursor].key];
    keys.forEach((k) => (s.local[k] = [value, Date.now()]));
    s.selected.clear();
    send();
    paint();
  }
  function toggle(key) {
    if (s.selected.has(key)) s.selected.delete(key);
    else s.selected.add(key);
    paint();
  }
  function move(step) {
    s.cursor = Math.max(0, Math.min(items.length - 1, s.cursor + step));
    paint();
    const c = cards[s.cursor];
    if (c && !s.open) c.scrollIntoView({ block: "nearest" });
  }
  function perRow() {
    if (cards.length < 2) return 1;
    const top = cards[0].offsetTop;
    const n = cards.findIndex((c) => c.offsetTop !== top);
    return n < 0 ? cards.length : n;
  }
  function openBox() {
    s.open = true;
    paint();
  }
  function closeBox() {
    s.open = false;
    paint();
  }

  function paint() {
    const up = Object.keys(server).length;
    let pos = 0;
    let neg = 0;
    items.forEach((it, i) => {
      const v = label(it.key);
      const c = cards[i];
      c.classList.toggle("sg-pos", v === 1);
      c.classList.toggle("sg-neg", v === 0);
      c.classList.toggle("sg-cursor", i === s.cursor);
      c.classList.toggle("sg-selected", s.selected.has(it.key));
      c.querySelector(".sg-tick").checked = s.selected.has(it.key);
      const mark = c.querySelector(".sg-mark");
      if (mark.dataset.v !== String(v)) {
        rich(mark, v === 1 ? [[UP]] : v === 0 ? [[DOWN]] : []);
        mark.dataset.v = String(v);
      }
      if (v === 1) pos += 1;
      if (v === 0) neg += 1;
    });
    const sel = s.selected.size ? ` · ${s.selected.size} selected` : "";
    rich(
      root.querySelector(".sg-count"),
      data.mode === "label"
        ? [`${pos} `, [UP], ` · ${neg} `, [DOWN], ` here${sel}`]
        : [`${items.length} shown${sel}`]
    );
    const st = root.querySelector(".sg-status");
    if (data.mode === "label") {
      const ok = saved();
      st.textContent = ok ? `saved (${up} labels)` : "saving…";
      st.dataset.saved = ok ? "1" : "0";
      if (ok && s.lastKey !== null) {
        s.savedTimes.push(performance.now() - s.lastKey);
        s.lastKey = null;
        root.dataset.savedMs = JSON.stringify(s.savedTimes.slice(-50));
      }
    }
    root.dataset.cursor = String(s.cursor);
    lightbox.classList.toggle("sg-open", s.open);
    if (s.open) drawBox();
  }

  function drawBox() {
    const it = items[s.cursor];
    lightbox.replaceChildren();
    const panel = el("div", "sg-panel");
    const pic = el("div", "sg-big");
    if (it.src) {
      const img = el("img");
      img.src = it.src;
      img.alt = it.caption || it.key;
      pic.appendChild(img);
    } else pic.appendChild(el("span", "sg-noimg", "no image: " + (it.why || "")));
    panel.appendChild(pic);
    const side = el("div", "sg-side");
    side.appendChild(el("div", "sg-pos-of", `${s.cursor + 1} of ${items.length}`));
    side.appendChild(el("div", "sg-bcap", it.caption || "(no caption)"));
    side.appendChild(el("div", "sg-bline", it.line || ""));
    const v = label(it.key);
    side.appendChild(rich(el("div", "sg-blabel"), v === 1 ? [[UP]] : v === 0 ? [[DOWN]] : ["unlabelled"]));
    const table = el("table", "sg-details");
    Object.entries(it.details || {}).forEach(([k, val]) => {
      const tr = el("tr");
      tr.appendChild(el("th", "", k));
      tr.appendChild(el("td", "", val === null ? "" : String(val)));
      table.appendChild(tr);
    });
    side.appendChild(table);
    side.appendChild(el("div", "sg-keys", KEYS));
    const close = el("button", "sg-btn sg-close", "Close (Esc)");
    close.type = "button";
    close.onclick = (ev) => {
      ev.stopPropagation();
      closeBox();
    };
    side.appendChild(close);
    panel.appendChild(side);
    lightbox.appendChild(panel);
  }

  if (s.onkey) document.removeEventListener("keydown", s.onkey, true);
  s.onkey = (ev) => {
    if (window.__sieveActiveGrid !== parentElement || !root.isConnected || typing(ev)) return;
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const t0 = ev.timeStamp || performance.now(); // from the key event itself
    const k = ev.key;
    let labelled = false;
    if (k === "ArrowRight") move(1);
    else if (k === "ArrowLeft") move(-1);
    else if (k === "ArrowDown" && !s.open) move(perRow());
    else if (k === "ArrowUp" && !s.open) move(-perRow());
    else if (k === "Enter") openBox();
    else if (k === "Escape") {
      if (s.open) closeBox();
      else {
        s.selected.clear();
        paint();
      }
    } else if (k === "x") toggle(items[s.cursor].key);
    else if (data.mode === "label" && (k === "1" || k === "2" || k === "3")) {
      if (k !== "3") {
        setLabel(items[s.cursor].key, k === "1" ? 1 : 0);
        send();
      }
      labelled = true;
      move(1);
    } else return;
    ev.preventDefault();
    ev.stopPropagation();
    if (labelled) {
      if (k !== "3") s.lastKey = t0;
      // the label is drawn and the next card has the cursor: the next key can be given now
      requestAnimationFrame(() => {
        s.times.push(performance.now() - t0);
        root.dataset.labelMs = JSON.stringify(s.times.slice(-50));
      });
    }
  };
  document.addEventListener("keydown", s.onkey, true);
  paint();
  return () => {
    document.removeEventListener("keydown", s.onkey, true);
  };
}
