// Shared by index.html and judgements.html: the access token, JSON and NDJSON requests,
// error and status lines, and element building (always textContent, never HTML from data).
"use strict";

const LF = (() => {
  const TOKEN_KEY = "lmforge.token";
  let onTokenSaved = null; // what to retry once the user has entered a token

  // A token in the address (#token=...) wins and is moved to localStorage, so that it does
  // not stay in the address bar, the history or a shared screenshot.
  (function takeTokenFromFragment() {
    const match = location.hash.match(/(?:^#|&)token=([^&]*)/);
    if (!match) return;
    localStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  })();

  const $ = (selector) => document.querySelector(selector);

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function token() {
    return localStorage.getItem(TOKEN_KEY) || "";
  }

  function headers(extra = {}) {
    const h = { ...extra };
    if (token()) h.Authorization = `Bearer ${token()}`;
    return h;
  }

  function showError(message) {
    const box = $("#error");
    box.textContent = message;
    box.hidden = false;
  }

  function clearError() {
    const box = $("#error");
    box.textContent = "";
    box.hidden = true;
  }

  function showStatus(message) {
    const line = $("#status");
    line.textContent = message;
    line.hidden = false;
  }

  function askForToken(message, retry) {
    onTokenSaved = retry || onTokenSaved;
    $("#token-box").hidden = false;
    showError(message || "This server needs an access token.");
    $("#token-input").focus();
  }

  function hideTokenBox() {
    $("#token-box").hidden = true;
  }

  // Errors carry the server's message ({"error": {"message": ...}}) when there is one.
  async function errorFrom(response) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) {
      // not JSON (a proxy's error page, say): the status line will do
    }
    const error = new Error(message);
    error.status = response.status;
    return error;
  }

  async function request(path, options = {}) {
    let response;
    try {
      response = await fetch(path, { ...options, headers: headers(options.headers) });
    } catch (e) {
      throw new Error(`Cannot reach the server (${e.message}).`);
    }
    if (!response.ok) {
      const error = await errorFrom(response);
      if (response.status === 401) askForToken(error.message);
      throw error;
    }
    clearError();
    return response;
  }

  async function getJSON(path) {
    return (await request(path)).json();
  }

  async function postJSON(path, body) {
    const response = await request(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    return response.json();
  }

  // POST a body and call onEvent for every line of the NDJSON stream. Resolves after
  // {"type": "done"}; rejects on an error line or a stream that ends early.
  async function stream(path, body, onEvent) {
    const response = await request(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      // stream: true keeps a multi-byte character split across chunks for the next read
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).trim();
        buffer = buffer.slice(newline + 1);
        if (!line) continue;
        const event = JSON.parse(line);
        if (event.type === "error") throw new Error(event.message || "generation failed");
        if (event.type === "done") {
          reader.cancel().catch(() => {});
          return;
        }
        onEvent(event);
      }
      if (done) throw new Error("The connection closed before the answers were finished.");
    }
  }

  // crypto.randomUUID exists only in secure contexts (https, localhost); a server reached
  // over plain http on a LAN address still needs idempotency keys.
  function uuid() {
    if (crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const hex = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  }

  // The token box is in both pages; saving checks the token against an endpoint that needs
  // it, then calls `retry` (the page's next step).
  function setupTokenBox(retry) {
    onTokenSaved = retry || null;
    const save = async () => {
      const value = $("#token-input").value.trim();
      if (!value) return;
      localStorage.setItem(TOKEN_KEY, value);
      try {
        await request("/api/judgements?limit=1");
      } catch (e) {
        if (e.status !== 401) showError(e.message);
        return;
      }
      $("#token-input").value = "";
      hideTokenBox();
      if (onTokenSaved) onTokenSaved();
    };
    $("#token-save").addEventListener("click", save);
    $("#token-input").addEventListener("keydown", (e) => {
      if (e.key === "Enter") {
        e.preventDefault();
        save();
      }
    });
  }

  function ordinal(n) {
    const tens = n % 100;
    if (tens >= 11 && tens <= 13) return `${n}th`;
    return `${n}${{ 1: "st", 2: "nd", 3: "rd" }[n % 10] || "th"}`;
  }

  return {
    $, el, token, showError, clearError, showStatus, askForToken, hideTokenBox,
    request, getJSON, postJSON, stream, uuid, setupTokenBox, ordinal,
  };
})();
