// A small, safe markdown renderer for the chat page: the text is HTML-escaped first, then only our own
// tags are added (code fences, inline code, bold, italic, strikethrough, headings, lists, quotes,
// paragraphs). No links, images or raw HTML: nothing the model writes can become markup or a request.
// An unclosed code fence (a reply still streaming) renders as code up to the end.
(function () {
  "use strict";

  const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ESC[c]);
  const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+.#-]*)/;
  const ITEM = /^\s*(?:[-*+]|\d{1,9}[.)])\s+(.*)$/;
  const HEADING = /^(#{1,6})\s+(.*?)\s*#*\s*$/;
  const QUOTE = /^\s*&gt;\s?(.*)$/;
  const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;

  // Inline spans of already-escaped text; code spans are set aside first so nothing inside them changes.
  function inline(s) {
    const codes = [];
    s = s.replace(/(`+)([^`\n]|[^`\n][\s\S]*?[^`\n])\1(?!`)/g, (_, __, code) => {
      codes.push(code);
      return "\u0000" + (codes.length - 1) + "\u0000";
    });
    s = s
      .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
      .replace(/\*(?=[^\s*])([^*\n]*?[^\s*])\*/g, "<em>$1</em>")
      .replace(/(^|[^\w])_(?=[^\s_])([^_\n]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>")
      .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
    return s.replace(/\u0000(\d+)\u0000/g, (_, i) => "<code>" + codes[Number(i)] + "</code>");
  }

  const startsBlock = (line) =>
    FENCE.test(line) || HEADING.test(line) || ITEM.test(line) || QUOTE.test(line) || RULE.test(line);

  function fence(lines, i, out) {
    const [, mark, lang] = lines[i].match(FENCE);
    const body = [];
    i++;
    while (i < lines.length && !lines[i].trim().startsWith(mark)) body.push(lines[i++]);
    const cls = lang ? ` class="language-${lang}"` : "";
    out.push(`<pre><code${cls}>${body.join("\n")}</code></pre>`);
    return i + 1; // past the closing fence (or the end)
  }

  function list(lines, i, out) {
    const ordered = /^\s*\d/.test(lines[i]);
    const items = [];
    for (; i < lines.length; i++) {
      const m = lines[i].match(ITEM);
      if (m && /^\s*\d/.test(lines[i]) === ordered) items.push(m[1]);
      else if (!m && items.length && /^\s{2,}\S/.test(lines[i])) items[items.length - 1] += "\n" + lines[i].trim();
      else break;
    }
    const tag = ordered ? "ol" : "ul";
    out.push(`<${tag}>` + items.map((t) => `<li>${inline(t).replace(/\n/g, "<br>")}</li>`).join("") + `</${tag}>`);
    return i;
  }

  function blocks(lines) {
    const out = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (!line.trim()) i++;
      else if (FENCE.test(line)) i = fence(lines, i, out);
      else if (RULE.test(line)) (out.push("<hr>"), i++);
      else if ((m = line.match(HEADING))) (out.push(`<h${m[1].length}>${inline(m[2])}</h${m[1].length}>`), i++);
      else if (ITEM.test(line)) i = list(lines, i, out);
      else if (QUOTE.test(line)) {
        const quoted = [];
        while (i < lines.length && (m = lines[i].match(QUOTE))) (quoted.push(m[1]), i++);
        out.push(`<blockquote>${blocks(quoted)}</blockquote>`);
      } else {
        const para = [];
        while (i < lines.length && lines[i].trim() && !startsBlock(lines[i])) para.push(lines[i++]);
        out.push(`<p>${inline(para.join("\n")).replace(/\n/g, "<br>")}</p>`);
      }
    }
    return out.join("\n");
  }

  function render(text) {
    const clean = String(text).replace(/\u0000/g, "").replace(/\r\n?/g, "\n");
    return blocks(escapeHtml(clean).split("\n"));
  }

  window.dsv4Markdown = { render, escapeHtml };
})();
