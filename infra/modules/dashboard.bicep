// The task dashboard: an Azure Monitor workbook on the worker's JSON log lines
// (WORKER_LOG_FORMAT=json, one object per line), shared by both paths. ACI
// container groups write stdout/stderr to ContainerInstanceLog_CL (column
// Message), Container Apps to ContainerAppConsoleLogs_CL (column Log_s); the
// queries read whichever exists. Every log field and message text they use is
// one the binary writes: tests/infra.rs runs the binary and compares.

@minLength(2)
@maxLength(20)
param client string
param location string = resourceGroup().location
param tags object = {}

@description('Resource id of the Log Analytics workspace the containers log to.')
param workspaceId string

// The worker's JSON lines from either path, parsed: `log.message`,
// `log.level`, `log.duration_ms`, `log.status`, `log.span.task_type`, ...
var linesQuery = '''
let entries = union isfuzzy=true
    (ContainerInstanceLog_CL | project TimeGenerated, Line = Message),
    (ContainerAppConsoleLogs_CL | project TimeGenerated, Line = Log_s)
| extend log = parse_json(Line);
'''
// One line per attempt at a task, with its outcome.
var outcomesQuery = '''
entries
| where tostring(log.message) in ("task succeeded", "task did not succeed")
| extend outcome = iff(tostring(log.message) == "task succeeded", "succeeded", tostring(log.status)),
         task_type = tostring(log.span.task_type)
| summarize attempts = count() by task_type, outcome
| order by task_type asc, outcome asc
'''
var durationsQuery = '''
entries
| where tostring(log.message) in ("task succeeded", "task did not succeed")
| summarize attempts = count(),
            p50_ms = percentile(toreal(log.duration_ms), 50),
            p90_ms = percentile(toreal(log.duration_ms), 90),
            p99_ms = percentile(toreal(log.duration_ms), 99)
    by task_type = tostring(log.span.task_type)
| order by attempts desc
'''
var settlementsQuery = '''
entries
| where tostring(log.message) in ("message moved to the poison queue", "webhook handed to the outbox", "webhook delivered from the outbox")
| summarize count() by day = bin(TimeGenerated, 1d), event = tostring(log.message)
| order by day desc
'''
// Container time per day, from the attempts' own durations: what ACI and the
// Consumption profile bill scales with it (plus start-up), per task type.
var taskTimeQuery = '''
entries
| where tostring(log.message) in ("task succeeded", "task did not succeed")
| summarize task_seconds = sum(toreal(log.duration_ms)) / 1000.0 by day = bin(TimeGenerated, 1d), task_type = tostring(log.span.task_type)
| order by day desc
'''
// The hourly backlog report of the ACI cleanup workflow (visible task
// messages and the oldest insertion time, when one waits too long).
var backlogQuery = '''
AzureDiagnostics
| where ResourceProvider == "MICROSOFT.LOGIC" and resource_actionName_s == "Report_backlog" and status_s == "Succeeded"
| project TimeGenerated, queue = trackedProperties_queue_s, visible = trackedProperties_visible_s, oldest = trackedProperties_oldest_s
| order by TimeGenerated desc
'''
// What every query panel shares (workbook item type 3: a KQL query on the
// workspace, last 24 hours).
var kqlItem = {
  version: 'KqlItem/1.0'
  size: 0
  timeContext: {
    durationMs: 86400000
  }
  queryType: 0
  resourceType: 'microsoft.operationalinsights/workspaces'
}
var workbook = {
  version: 'Notebook/1.0'
  items: [
    {
      type: 1
      name: 'intro'
      content: {
        json: '## Worker tasks (${client})\nFrom the worker\'s JSON log lines: one line per attempt; retried attempts count once each.'
      }
    }
    {
      type: 3
      name: 'outcomes'
      content: union(kqlItem, {
        title: 'Attempts by outcome and task type'
        query: '${linesQuery}${outcomesQuery}'
        visualization: 'table'
      })
    }
    {
      type: 3
      name: 'durations'
      content: union(kqlItem, {
        title: 'Attempt duration percentiles (ms) by task type'
        query: '${linesQuery}${durationsQuery}'
        visualization: 'table'
      })
    }
    {
      type: 3
      name: 'settlements'
      content: union(kqlItem, {
        title: 'Poisoned messages and outbox hand-overs per day'
        query: '${linesQuery}${settlementsQuery}'
        visualization: 'barchart'
      })
    }
    {
      type: 3
      name: 'task-time'
      content: union(kqlItem, {
        title: 'Task seconds per day (what compute cost scales with)'
        query: '${linesQuery}${taskTimeQuery}'
        visualization: 'barchart'
      })
    }
    {
      type: 3
      name: 'backlog'
      content: union(kqlItem, {
        title: 'Stalled intake: oldest visible task message (ACI)'
        query: '${linesQuery}${backlogQuery}'
        visualization: 'table'
      })
    }
  ]
  fallbackResourceIds: [
    workspaceId
  ]
}

resource dashboard 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, 'worker-dashboard', client)
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: 'Worker tasks (${client})'
    category: 'workbook'
    sourceId: workspaceId
    serializedData: string(workbook)
  }
}

output workbookId string = dashboard.id
