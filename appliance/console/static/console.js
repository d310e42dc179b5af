// Small progressive touches; every page reads and works without them.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // Copy a new secret to the clipboard (the button is hidden until this script shows it).
  for (const button of document.querySelectorAll("button.copy")) {
    const field = document.getElementById(button.dataset.copy);
    const status = document.querySelector(".copied");
    button.hidden = false;
    button.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(field.value);
        status.textContent = "Copied.";
      } catch {
        field.select();
        status.textContent = "Selected: press Ctrl+C to copy.";
      }
    });
  }
  // Ask before a change that cuts an app off.
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
});
