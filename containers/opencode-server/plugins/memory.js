// OpenCode plugin: remembers what happens in a project through memory_manager.py.
//
// Stores (queued, detached, never blocking the agent, never throwing into OpenCode):
//   file.edited     "Edited <path>"
//   session.error   "Session error: <name>: <message>"
//   a completed turn (session.idle): what the user asked and which tools ran
// Recall: the first model call of a session gets the memories relevant to the user's first
// message added to its system prompt (experimental.chat.system.transform; pinned to OpenCode
// 1.18.33). The agent can always recall mid-task through the MCP server's search_memory_facts.
//
// One memory group per project: the normalised git remote URL (so a fresh clone finds its old
// memories and two projects never share them), else the directory; MEMORY_GROUP_ID overrides. The
// MCP server started in the project directory serves the same group. The group is logged at start.
//
// Environment: MEMORY_MANAGER (path of memory_manager.py), MEMORY_PYTHON (default python3),
// MEMORY_GROUP_ID, MEMORY_RECALL (on/off, default on), MEMORY_RECALL_TIMEOUT_MS (default 3000),
// MEMORY_RECALL_BUDGET_TOKENS (default 1500),
// plus the memory manager's own variables, which its processes inherit. No npm dependencies.

import { execFile, execFileSync, spawn } from "node:child_process"
import path from "node:path"

const PYTHON = process.env.MEMORY_PYTHON || "python3"
const SCRIPT = process.env.MEMORY_MANAGER || "/opt/opencode/graphiti/memory_manager.py"
const RECALL = (process.env.MEMORY_RECALL || "on") !== "off"
const RECALL_TIMEOUT_MS = Number(process.env.MEMORY_RECALL_TIMEOUT_MS || 3000)
const RECALL_BUDGET_TOKENS = Number(process.env.MEMORY_RECALL_BUDGET_TOKENS || 1500)
const MAX_CONTENT = 8000 // characters per stored event: a concise note, not a transcript

// The project's group, by the memory manager's own rule (`memory_manager.py group DIR`: the
// normalised git remote, else the directory), which its MCP server applies to its working directory
// too: what the plugin stores there, the agent's search_memory_facts finds.
function projectGroup(directory) {
  if (process.env.MEMORY_GROUP_ID) return process.env.MEMORY_GROUP_ID
  try {
    return execFileSync(PYTHON, [SCRIPT, "group", directory], {
      encoding: "utf8", stdio: ["ignore", "pipe", "ignore"], timeout: 10000,
    }).trim() || "opencode"
  } catch {
    return "opencode" // the memory manager cannot run here: its stores fail the same way
  }
}

// The plugin is the file's only export: OpenCode calls every exported function as a plugin.
export const MemoryPlugin = async ({ client, directory, worktree }) => {
  const root = worktree || directory
  const group = projectGroup(root)
  try {
    await client?.app?.log?.({ body: { service: "memory", level: "info", message: `memory group ${group}` } })
  } catch {}
  const env = { ...process.env, MEMORY_GROUP_ID: group }
  const turns = new Map() // sessionID -> {asked, tools}
  const recalled = new Set()

  const store = (content, metadata) => {
    try {
      const child = spawn(PYTHON, [SCRIPT, "store", "-", JSON.stringify({ ...metadata, group })], {
        env, detached: true, stdio: ["pipe", "ignore", "ignore"],
      })
      child.on("error", () => {})
      child.stdin.on("error", () => {})
      child.stdin.end(content.slice(0, MAX_CONTENT))
      child.unref()
    } catch {
      // a memory must never cost the agent its turn
    }
  }

  const relative = (file) => (file && path.isAbsolute(file) ? path.relative(root, file) || file : file)
  const turn = (sessionID) => {
    if (!turns.has(sessionID)) turns.set(sessionID, { asked: "", tools: [] })
    return turns.get(sessionID)
  }

  // One deterministic block within a budget (`context`): the same memories and question give the
  // same bytes, so the provider's prompt cache keeps holding.
  const recall = (question) => new Promise((resolve) => {
    execFile(PYTHON, [SCRIPT, "context", "--budget-tokens", String(RECALL_BUDGET_TOKENS), "--",
      question.slice(0, 2000)], {
      env, timeout: RECALL_TIMEOUT_MS, encoding: "utf8",
    }, (error, stdout) => resolve(error ? "" : stdout.trim()))
  })

  return {
    event: async ({ event }) => {
      try {
        const props = event.properties || {}
        if (event.type === "file.edited" && props.file) {
          store(`Edited ${relative(props.file)}`, { event: "file.edited", file: relative(props.file) })
        } else if (event.type === "session.error") {
          const error = props.error || {}
          const message = (error.data && error.data.message) || error.message || ""
          store(`Session error: ${error.name || "error"}: ${message}`.trim(), {
            event: "session.error", session: props.sessionID || null,
          })
        } else if (event.type === "session.idle" && props.sessionID) {
          const done = turns.get(props.sessionID)
          turns.delete(props.sessionID)
          if (done && done.asked) {
            const tools = done.tools.length ? ` Tools used: ${done.tools.join(", ")}.` : ""
            store(`Completed a turn. The user asked: ${done.asked}${tools}`, {
              event: "turn.completed", session: props.sessionID,
            })
          }
        }
      } catch {
        // never throw into OpenCode
      }
    },

    "chat.message": async (input, output) => {
      try {
        const text = (output.parts || []).filter((p) => p.type === "text" && !p.synthetic)
          .map((p) => p.text).join("\n").trim()
        if (text) turn(input.sessionID).asked = text.slice(0, 1000)
      } catch {}
    },

    "tool.execute.after": async (input) => {
      try {
        const args = input.args || {}
        const target = args.filePath || args.path || args.command || ""
        const described = target ? `${input.tool}(${relative(String(target)).slice(0, 120)})` : input.tool
        turn(input.sessionID).tools.push(described)
      } catch {}
    },

    "experimental.chat.system.transform": async (input, output) => {
      try {
        const sessionID = input.sessionID
        if (!RECALL || !sessionID || recalled.has(sessionID)) return
        recalled.add(sessionID)
        const asked = turns.has(sessionID) ? turns.get(sessionID).asked : ""
        if (!asked) return
        const memories = await recall(asked)
        if (memories && !memories.endsWith("No relevant memories found.")) {
          output.system.push(`Memories of this project from earlier sessions (events with their times, facts ` +
            `with their validity):\n${memories}`)
        }
      } catch {}
    },
  }
}
