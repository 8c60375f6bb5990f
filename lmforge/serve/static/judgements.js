// The judgements page: counts and the latest judgements, newest first.
// Everything from the server goes into the DOM through textContent (LF.el).
"use strict";

const LIMIT = 200;

function breakdown(counts) {
  const entries = Object.entries(counts || {}).sort((x, y) => y[1] - x[1]);
  if (!entries.length) return [LF.el("span", "", "none yet")];
  return entries.map(([name, n]) => LF.el("span", "", `${name}: ${n}`));
}

// The answers in the order of response_ids: a pair's winner marked, a ranking's places.
function answersCell(j) {
  const list = LF.el("ol", "answers");
  j.responses.forEach((response, i) => {
    let tag;
    let won = false;
    if (j.kind === "ranking") {
      tag = LF.ordinal(i + 1);
      won = i === 0;
    } else {
      const side = i === 0 ? "a" : "b";
      won = j.choice === side;
      tag = side.toUpperCase() + (won ? " ✓ preferred" : j.choice === "tie" ? " (tie)" : "");
    }
    const item = LF.el("li", won ? "won" : "");
    item.dataset.responseId = response.id;
    item.append(LF.el("span", "tag", tag), document.createTextNode(response.text));
    list.append(item);
  });
  const cell = LF.el("td", "answers-cell");
  cell.append(list);
  return cell;
}

function row(j) {
  const tr = LF.el("tr", "judgement");
  tr.dataset.id = j.id;
  const time = new Date(j.created_at * 1000);
  const timeCell = LF.el("td", "time", time.toLocaleString());
  timeCell.title = time.toISOString();
  tr.append(
    LF.el("td", "id", j.id),
    LF.el("td", "kind", j.kind),
    LF.el("td", "source", j.source),
    LF.el("td", "annotator", j.annotator),
    timeCell,
    LF.el("td", "prompt text", j.prompt),
    answersCell(j),
    LF.el("td", "choice", j.choice === null || j.choice === undefined ? "—" : j.choice),
  );
  return tr;
}

async function load() {
  let data;
  try {
    data = await LF.getJSON(`/api/judgements?limit=${LIMIT}`);
  } catch (e) {
    LF.showError(e.message);
    return;
  }
  const c = data.counts;
  for (const key of ["total", "pair", "ranking", "tie"]) {
    LF.$(`#count-${key}`).textContent = c[key];
  }
  LF.$("#count-annotators").replaceChildren(...breakdown(c.by_annotator));
  LF.$("#count-sources").replaceChildren(...breakdown(c.by_source));
  LF.$("#judgements-table tbody").replaceChildren(...data.judgements.map(row));
  LF.$("#shown").textContent = `showing the latest ${data.judgements.length} of ${c.total}`;
}

LF.setupTokenBox(load);
LF.$("#refresh").addEventListener("click", load);
load();
