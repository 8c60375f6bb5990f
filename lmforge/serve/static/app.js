// The annotation page: chat with regenerate-and-compare, side by side, and ranking.
// Model and user text only ever reaches the DOM through textContent (see LF.el).
"use strict";

const { $, el, showError, showStatus } = LF;
const ANNOTATOR_KEY = "lmforge.annotator";
const CHOICE_KEYS = { 1: "a", 2: "b", 3: "tie" };

const S = {
  config: null,
  mode: "chat",
  busy: false, // one request at a time: answers stream in, or a judgement is being saved
  // messages: the conversation as sent to the server; last: the answer that ends it;
  // pending: a regenerated answer waiting for its judgement
  chat: { messages: [], conversationId: null, last: null, pending: null },
  sbs: { ids: [], pending: false, requestId: null },
  rank: { ids: [], order: [], ready: false, done: false, requestId: null },
};

// ---- shared -------------------------------------------------------------------------------
function annotator() {
  const name = $("#annotator").value.trim();
  if (!name) {
    showError("Enter your name in the Annotator box first: every judgement records who made it.");
    $("#annotator").focus();
    return null;
  }
  return name;
}

function sampling() {
  const out = {};
  const temperature = parseFloat($("#temperature").value);
  const maxTokens = parseInt($("#max-tokens").value, 10);
  if (Number.isFinite(temperature)) out.temperature = temperature;
  if (Number.isFinite(maxTokens)) out.max_tokens = maxTokens;
  return out;
}

function setBusy(busy) {
  S.busy = busy;
  document.body.classList.toggle("busy", busy);
  for (const id of ["#chat-send", "#sbs-send", "#rank-send"]) $(id).disabled = busy;
  $("#regenerate").disabled = busy || !S.chat.last || !!S.chat.pending;
}

// Refuse a second request instead of queueing it: the answers of the first are still coming.
function ready() {
  if (S.busy) showError("Wait for the current answers to finish.");
  return !S.busy;
}

function setMode(mode) {
  S.mode = mode;
  for (const [name, tab] of [["chat", "#mode-chat"], ["sbs", "#mode-sbs"], ["rank", "#mode-rank"]]) {
    $(`#${name}`).hidden = name !== mode;
    $(tab).classList.toggle("active", name === mode);
    $(tab).setAttribute("aria-selected", String(name === mode));
  }
  $(`#${mode}-input`).focus();
}

function markTruncated(node, finishReason) {
  node.classList.toggle("truncated", finishReason === "length");
}

// A judgement is sent with one request_id however often it is retried. If a first attempt
// was stored but its reply lost, and the annotator then picks differently, the server answers
// 409: the first choice stands (each comparison is judged once), and the page moves on.
async function saveJudgement(body) {
  try {
    return await LF.postJSON("/api/judgements", body);
  } catch (e) {
    if (e.status !== 409) throw e;
    return { id: null, conflict: e.message };
  }
}

function savedText(saved) {
  return saved.id === null ? `already saved: ${saved.conflict}` : `saved judgement #${saved.id}`;
}

// ---- chat ---------------------------------------------------------------------------------
function addMessage(role, text) {
  const hint = $("#chat-log .empty-hint");
  if (hint) hint.remove();
  const node = el("div", `msg ${role}`, text);
  $("#chat-log").append(node);
  scrollLog();
  return node;
}

function scrollLog() {
  const log = $("#chat-log");
  log.scrollTop = log.scrollHeight;
}

async function chatSend() {
  const chat = S.chat;
  if (chat.pending) {
    showError("Judge the regenerated answer first: 1 better, 2 worse, 3 tie.");
    return;
  }
  const text = $("#chat-input").value;
  if (!text.trim() || !ready()) return;
  const who = annotator();
  if (!who) return;
  const messages = [...chat.messages, { role: "user", content: text }];
  const userNode = addMessage("user", text);
  const answerNode = addMessage("assistant", "");
  answerNode.classList.add("streaming");
  $("#chat-input").value = "";
  setBusy(true);
  try {
    let promptId = null;
    let answer = null;
    await LF.stream(
      "/api/respond",
      {
        messages, n: 1, prompt_id: null, conversation_id: chat.conversationId,
        annotator: who, mode: "chat", ...sampling(),
      },
      (event) => {
        if (event.type === "prompt") {
          promptId = event.prompt_id;
          chat.conversationId = event.conversation_id;
        } else if (event.type === "delta") {
          answerNode.textContent += event.text;
          scrollLog();
        } else if (event.type === "response") {
          answer = event;
          answerNode.textContent = event.text; // the server's full text is the reference
        }
      },
    );
    if (!answer) throw new Error("The server finished without an answer.");
    answerNode.dataset.responseId = answer.response_id;
    markTruncated(answerNode, answer.finish_reason);
    chat.messages = [...messages, { role: "assistant", content: answer.text }];
    chat.last = {
      promptId, responseId: answer.response_id, text: answer.text,
      finishReason: answer.finish_reason, node: answerNode,
    };
  } catch (e) {
    // The turn did not happen: take it out again and give the text back to edit or resend.
    userNode.remove();
    answerNode.remove();
    $("#chat-input").value = text;
    showError(e.message);
  } finally {
    answerNode.classList.remove("streaming");
    setBusy(false);
  }
}

function setJudgeButtons(enabled) {
  for (const id of ["#judge-better", "#judge-worse", "#judge-tie"]) $(id).disabled = !enabled;
}

async function regenerate() {
  const chat = S.chat;
  if (!chat.last || chat.pending || !ready()) return;
  const who = annotator();
  if (!who) return;
  const previous = chat.last;
  const box = $("#compare");
  const newNode = box.querySelector(".answer.new");
  const previousNode = box.querySelector(".answer.previous");
  previousNode.textContent = previous.text;
  markTruncated(previousNode, previous.finishReason);
  newNode.textContent = "";
  newNode.className = "answer new streaming"; // no mark left from the last comparison
  setJudgeButtons(false);
  box.hidden = false;
  previous.node.classList.add("under-review");
  setBusy(true);
  try {
    let answer = null;
    await LF.stream(
      "/api/respond",
      {
        messages: chat.messages.slice(0, -1), n: 1, prompt_id: previous.promptId,
        conversation_id: chat.conversationId, annotator: who, mode: "chat", ...sampling(),
      },
      (event) => {
        if (event.type === "delta") newNode.textContent += event.text;
        else if (event.type === "response") {
          answer = event;
          newNode.textContent = event.text;
        }
      },
    );
    if (!answer) throw new Error("The server finished without an answer.");
    markTruncated(newNode, answer.finish_reason);
    // One request id per judgement, so that resending after a lost reply cannot count twice.
    chat.pending = { answer, previous, requestId: LF.uuid() };
    setJudgeButtons(true);
    $("#judge-better").focus(); // out of any text box, so that 1/2/3 work at once
  } catch (e) {
    box.hidden = true;
    previous.node.classList.remove("under-review");
    showError(e.message);
  } finally {
    newNode.classList.remove("streaming");
    setBusy(false);
  }
}

async function judgeRegenerated(choice) {
  const chat = S.chat;
  const pending = chat.pending;
  if (!pending || !ready()) return;
  const who = annotator();
  if (!who) return;
  setJudgeButtons(false);
  setBusy(true);
  try {
    const saved = await saveJudgement({
      kind: "pair", response_ids: [pending.answer.response_id, pending.previous.responseId],
      choice, annotator: who, source: "regenerate", request_id: pending.requestId,
    });
    const { previous, answer } = pending;
    if (choice !== "b") {
      // The conversation goes on from the preferred answer (the new one on a tie).
      previous.node.textContent = answer.text;
      previous.node.dataset.responseId = answer.response_id;
      markTruncated(previous.node, answer.finish_reason);
      chat.messages[chat.messages.length - 1] = { role: "assistant", content: answer.text };
      chat.last = {
        ...previous, responseId: answer.response_id, text: answer.text,
        finishReason: answer.finish_reason,
      };
    }
    previous.node.classList.remove("under-review");
    chat.pending = null;
    $("#compare").hidden = true;
    showStatus(savedText(saved));
    $("#chat-input").focus();
  } catch (e) {
    setJudgeButtons(true);
    showError(e.message);
  } finally {
    setBusy(false);
  }
}

function newChat() {
  if (S.chat.pending) {
    showError("Judge the regenerated answer first: 1 better, 2 worse, 3 tie.");
    return;
  }
  if (!ready()) return;
  S.chat = { messages: [], conversationId: null, last: null, pending: null };
  $("#chat-log").replaceChildren(el("p", "empty-hint", "New conversation: write a message below."));
  setBusy(false);
  $("#chat-input").focus();
}

// ---- side by side -------------------------------------------------------------------------
function setSbsButtons(enabled) {
  for (const id of ["#sbs-choose-a", "#sbs-choose-b", "#sbs-tie"]) $(id).disabled = !enabled;
}

async function sbsSend() {
  const text = $("#sbs-input").value;
  if (!text.trim() || !ready()) return;
  const who = annotator();
  if (!who) return;
  const columns = [$("#sbs-a"), $("#sbs-b")];
  for (const column of columns) {
    column.textContent = "";
    column.className = "answer streaming";
    delete column.dataset.responseId;
  }
  $("#sbs-prompt").textContent = text;
  $("#sbs-prompt").hidden = false;
  $("#sbs-input").value = "";
  S.sbs = { ids: [null, null], pending: false, requestId: LF.uuid() };
  setSbsButtons(false);
  setBusy(true);
  $("#sbs-answers").focus(); // out of the text box, so that 1/2/3 judge at once
  try {
    await LF.stream(
      "/api/respond",
      {
        messages: [{ role: "user", content: text }], n: 2, prompt_id: null,
        conversation_id: null, annotator: who, mode: "side_by_side", ...sampling(),
      },
      (event) => {
        const column = columns[event.index];
        if (event.type === "delta") column.textContent += event.text;
        else if (event.type === "response") {
          column.textContent = event.text;
          column.dataset.responseId = event.response_id;
          markTruncated(column, event.finish_reason);
          S.sbs.ids[event.index] = event.response_id;
        }
      },
    );
    if (S.sbs.ids.includes(null)) throw new Error("The server finished without both answers.");
    S.sbs.pending = true;
    setSbsButtons(true);
  } catch (e) {
    showError(e.message);
  } finally {
    for (const column of columns) column.classList.remove("streaming");
    setBusy(false);
  }
}

async function sbsChoose(choice) {
  if (!S.sbs.pending || !ready()) return;
  const who = annotator();
  if (!who) return;
  setSbsButtons(false);
  setBusy(true);
  try {
    const saved = await saveJudgement({
      kind: "pair", response_ids: S.sbs.ids, choice, annotator: who,
      source: "side_by_side", request_id: S.sbs.requestId,
    });
    S.sbs.pending = false;
    const [a, b] = [$("#sbs-a"), $("#sbs-b")];
    a.classList.add(choice === "a" ? "won" : choice === "b" ? "lost" : "tie");
    b.classList.add(choice === "b" ? "won" : choice === "a" ? "lost" : "tie");
    showStatus(savedText(saved));
    $("#sbs-input").focus();
  } catch (e) {
    setSbsButtons(true);
    showError(e.message);
  } finally {
    setBusy(false);
  }
}

// ---- ranking ------------------------------------------------------------------------------
function rankCards() {
  return [...document.querySelectorAll("#rank-answers .rank-answer")];
}

function renderRanking() {
  const { order, ready: complete, done } = S.rank;
  for (const card of rankCards()) {
    const place = order.indexOf(Number(card.dataset.index));
    card.classList.toggle("picked", place >= 0);
    card.querySelector(".rank-place").textContent = place >= 0 ? LF.ordinal(place + 1) : "";
  }
  $("#rank-order").replaceChildren(
    ...order.map((i, place) => el("li", "", `${LF.ordinal(place + 1)}: answer ${i + 1}`)),
  );
  $("#rank-undo").disabled = !complete || done || order.length === 0;
  $("#rank-submit").disabled = !complete || done || order.length !== S.rank.ids.length;
}

function rankPick(index) {
  const rank = S.rank;
  if (!rank.ready || rank.done || S.busy) return;
  if (index < 0 || index >= rank.ids.length || rank.order.includes(index)) return;
  rank.order.push(index);
  renderRanking();
}

function rankUndo() {
  if (!S.rank.ready || S.rank.done) return;
  S.rank.order.pop();
  renderRanking();
}

async function rankSend() {
  const text = $("#rank-input").value;
  if (!text.trim() || !ready()) return;
  const who = annotator();
  if (!who) return;
  const k = parseInt($("#rank-k").value, 10);
  const maxK = S.config ? S.config.max_k : 8;
  if (!(k >= 2 && k <= maxK)) {
    showError(`K must be between 2 and ${maxK}.`);
    return;
  }
  const cards = [];
  for (let i = 0; i < k; i++) {
    const card = el("div", "rank-answer");
    card.dataset.index = i;
    card.tabIndex = 0;
    card.setAttribute("role", "button");
    const head = el("div", "rank-head");
    head.append(el("kbd", "rank-num", i + 1), el("span", "rank-place"));
    card.append(head, el("div", "answer rank-text streaming"));
    card.addEventListener("click", () => rankPick(i));
    card.addEventListener("keydown", (e) => {
      // Enter on a card already placed falls through to the page: submit
      if ((e.key === "Enter" || e.key === " ") && !S.rank.order.includes(i)) {
        e.preventDefault();
        e.stopPropagation();
        rankPick(i);
      }
    });
    cards.push(card);
  }
  $("#rank-answers").replaceChildren(...cards);
  $("#rank-prompt").textContent = text;
  $("#rank-prompt").hidden = false;
  $("#rank-input").value = "";
  S.rank = { ids: new Array(k).fill(null), order: [], ready: false, done: false, requestId: LF.uuid() };
  renderRanking();
  setBusy(true);
  $("#rank-answers").focus(); // out of the text box, so that digits pick at once
  try {
    await LF.stream(
      "/api/respond",
      {
        messages: [{ role: "user", content: text }], n: k, prompt_id: null,
        conversation_id: null, annotator: who, mode: "ranking", ...sampling(),
      },
      (event) => {
        const body = cards[event.index] && cards[event.index].querySelector(".rank-text");
        if (!body) return;
        if (event.type === "delta") body.textContent += event.text;
        else if (event.type === "response") {
          body.textContent = event.text;
          markTruncated(body, event.finish_reason);
          cards[event.index].dataset.responseId = event.response_id;
          S.rank.ids[event.index] = event.response_id;
        }
      },
    );
    if (S.rank.ids.includes(null)) throw new Error("The server finished without all the answers.");
    S.rank.ready = true;
  } catch (e) {
    showError(e.message);
  } finally {
    for (const card of cards) card.querySelector(".rank-text").classList.remove("streaming");
    setBusy(false);
    renderRanking();
  }
}

async function rankSubmit() {
  const rank = S.rank;
  if (!rank.ready || rank.done || rank.order.length !== rank.ids.length || !ready()) return;
  const who = annotator();
  if (!who) return;
  setBusy(true);
  try {
    const saved = await saveJudgement({
      kind: "ranking", response_ids: rank.order.map((i) => rank.ids[i]), annotator: who,
      source: "ranking", request_id: rank.requestId,
    });
    rank.done = true;
    showStatus(savedText(saved));
    $("#rank-input").focus();
  } catch (e) {
    showError(e.message);
  } finally {
    setBusy(false);
    renderRanking();
  }
}

// ---- keys ---------------------------------------------------------------------------------
function sendOnEnter(textarea, send) {
  textarea.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
}

function onKey(e) {
  // e.code: Alt+digit types other characters on some layouts (macOS)
  const altDigit = /^Digit([123])$/.exec(e.code);
  if (e.altKey && altDigit && !e.ctrlKey && !e.metaKey) {
    e.preventDefault();
    setMode(["chat", "sbs", "rank"][Number(altDigit[1]) - 1]);
    return;
  }
  if (e.altKey || e.ctrlKey || e.metaKey) return;
  const target = e.target;
  if (target.matches("input, textarea, select, [contenteditable]")) {
    if (e.key === "Escape") target.blur();
    return;
  }
  // Enter and Space on a focused button or link are that control's own action.
  if ((e.key === "Enter" || e.key === " ") && target.matches("button, a")) return;

  let handled = true;
  if (S.mode === "chat") {
    if (S.chat.pending && CHOICE_KEYS[e.key]) judgeRegenerated(CHOICE_KEYS[e.key]);
    else if (e.key === "r") regenerate();
    else handled = false;
  } else if (S.mode === "sbs") {
    if (S.sbs.pending && CHOICE_KEYS[e.key]) sbsChoose(CHOICE_KEYS[e.key]);
    else handled = false;
  } else if (/^[1-9]$/.test(e.key)) rankPick(Number(e.key) - 1);
  else if (e.key === "Backspace") rankUndo();
  else if (e.key === "Enter") rankSubmit();
  else handled = false;
  if (handled) e.preventDefault();
}

// ---- start --------------------------------------------------------------------------------
async function init() {
  LF.setupTokenBox(() => showStatus("Token accepted."));
  $("#annotator").value = localStorage.getItem(ANNOTATOR_KEY) || "";
  $("#annotator").addEventListener("input", () =>
    localStorage.setItem(ANNOTATOR_KEY, $("#annotator").value.trim()),
  );
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => setMode(tab.dataset.mode));
  }
  $("#chat-send").addEventListener("click", chatSend);
  $("#regenerate").addEventListener("click", regenerate);
  $("#chat-new").addEventListener("click", newChat);
  $("#judge-better").addEventListener("click", () => judgeRegenerated("a"));
  $("#judge-worse").addEventListener("click", () => judgeRegenerated("b"));
  $("#judge-tie").addEventListener("click", () => judgeRegenerated("tie"));
  $("#sbs-send").addEventListener("click", sbsSend);
  $("#sbs-choose-a").addEventListener("click", () => sbsChoose("a"));
  $("#sbs-choose-b").addEventListener("click", () => sbsChoose("b"));
  $("#sbs-tie").addEventListener("click", () => sbsChoose("tie"));
  $("#rank-send").addEventListener("click", rankSend);
  $("#rank-undo").addEventListener("click", rankUndo);
  $("#rank-submit").addEventListener("click", rankSubmit);
  sendOnEnter($("#chat-input"), chatSend);
  sendOnEnter($("#sbs-input"), sbsSend);
  sendOnEnter($("#rank-input"), rankSend);
  document.addEventListener("keydown", onKey);

  try {
    S.config = await LF.getJSON("/api/config");
  } catch (e) {
    showError(`Cannot load the server's settings: ${e.message}`);
    return;
  }
  const { model, defaults, max_tokens_limit: limit, max_k: maxK } = S.config;
  $("#model-name").textContent = model;
  $("#temperature").value = defaults.temperature;
  $("#max-tokens").value = defaults.max_tokens;
  $("#max-tokens").max = limit;
  $("#rank-k").max = maxK;
  $("#rank-k").value = Math.min(4, maxK);
  if (S.config.auth_required) {
    if (!LF.token()) LF.askForToken("This server needs an access token: enter it to start.");
    else LF.request("/api/judgements?limit=1").catch((e) => showError(e.message));
  }
  $("#chat-input").focus();
}

init();
