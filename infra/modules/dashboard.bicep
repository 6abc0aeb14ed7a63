// The task dashboard: an Azure Monitor workbook on the worker's JSON log lines
// (WORKER_LOG_FORMAT=json, one object per line), shared by both paths. ACI
// container groups write stdout/stderr to ContainerInstanceLog_CL (column
// Message) through their logAnalytics integration; should ACI move that
// ingestion to the resource-specific ContainerInstanceLog (same column; see
// container-group.bicep for the docs), the queries read it too. Container
// Apps write ContainerAppConsoleLogs_CL (column Log_s). The queries read
// whichever exist (union isfuzzy); a line found in two tables (a diagnostic
// setting added to a group by policy writes both) counts once, because every
// line carries its own microsecond timestamp. Every log field and message
// text they use is one the binary writes: tests/infra.rs runs the binary and
// compares.

@minLength(2)
@maxLength(20)
param client string
param location string = resourceGroup().location
param tags object = {}

@description('Resource id of the Log Analytics workspace the containers log to.')
param workspaceId string

@description('vCPU cores of one task container or job replica (decimal string), for the cost estimate.')
param vcpuCores string

@description('Memory in GB (GiB on Container Apps) of one task container or job replica (decimal string), for the cost estimate.')
param memoryInGb string

// List prices are the caller's (each platform has its own): a decimal string
// in the billing currency, per second of one vCPU and of one GB of memory.
@description('List price per vCPU-second (decimal string), for the cost estimate.')
param pricePerVcpuSecond string

@description('List price per GB-second (decimal string), for the cost estimate.')
param pricePerGbSecond string

@description('Container Apps job whose execution history the dashboard shows; empty (ACI): no such panel.')
param jobName string = ''

// The worker's JSON lines from either path, parsed: `log.message`,
// `log.level`, `log.duration_ms`, `log.status`, `log.span.task_type`, ...
var linesQuery = '''
let entries = union isfuzzy=true
    (ContainerInstanceLog_CL | project TimeGenerated, Line = Message),
    (ContainerInstanceLog | project TimeGenerated, Line = Message),
    (ContainerAppConsoleLogs_CL | project TimeGenerated, Line = Log_s)
| summarize TimeGenerated = min(TimeGenerated) by Line
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
// The backlog report of the ACI cleanup workflow (visible task
// messages and the oldest insertion time, when one waits too long).
var backlogQuery = '''
AzureDiagnostics
| where ResourceProvider == "MICROSOFT.LOGIC" and resource_actionName_s == "Report_backlog" and status_s == "Succeeded"
| project TimeGenerated, queue = trackedProperties_queue_s, visible = trackedProperties_visible_s, oldest = trackedProperties_oldest_s
| order by TimeGenerated desc
'''
// Queue depths over time, the largest sample per 15 minutes: the task queues
// from the polling worker's minute summary (`queue depth`, every consumed
// queue, approximate count: visible or not), the webhook outboxes from the
// drain (`outbox depth`, every 30 s while one holds entries; polling mode,
// job mode, `worker deliver`). The ACI path runs neither mode, so it adds the
// cleanup workflow's backlog report: a lower bound (its peek sees at most 32
// visible messages), written only when the oldest visible task message has
// waited longer than backlogAlertMinutes, with that message's age.
var depthQuery = '''
entries
| where tostring(log.message) in ("queue depth", "outbox depth")
| project TimeGenerated, series = strcat(tostring(log.queue), " depth"), value = toreal(log.depth)
| union isfuzzy=true (AzureDiagnostics
    | where ResourceProvider == "MICROSOFT.LOGIC" and resource_actionName_s == "Report_backlog" and status_s == "Succeeded"
    | project TimeGenerated, queue = trackedProperties_queue_s, visible = toreal(trackedProperties_visible_s),
              age_min = datetime_diff("second", TimeGenerated, todatetime(trackedProperties_oldest_s)) / 60.0
    | mv-expand series = pack_array(strcat(queue, " depth (at least)"), strcat(queue, " oldest message age (min)")) to typeof(string),
                value = pack_array(visible, age_min) to typeof(real)
    | project TimeGenerated, series, value)
| summarize value = max(value) by TimeGenerated = bin(TimeGenerated, 15m), series
| order by TimeGenerated asc
'''
// Compute cost per day, estimated: task seconds × (vCPU × price per
// vCPU-second + GB × price per GB-second), with the size and list prices the
// deployment passes in. Only the attempts' own time: what a container bills
// around it (image pull and start-up, 15-25 s per ACI group; a job replica's
// start and exit) is not in the log lines, nor Logic App runs, free grants or
// discounts. Multi-line strings do not interpolate; the __…__ placeholders are
// replaced below.
var costQuery = '''
entries
| where tostring(log.message) in ("task succeeded", "task did not succeed")
| summarize task_seconds = sum(toreal(log.duration_ms)) / 1000.0 by day = bin(TimeGenerated, 1d)
| extend estimated_cost = round(task_seconds * (toreal("__VCPU__") * toreal("__PRICE_VCPU_SECOND__") + toreal("__GB__") * toreal("__PRICE_GB_SECOND__")), 4)
| order by day desc
'''
var costQueryPriced = replace(replace(replace(replace(costQuery, '__VCPU__', vcpuCores), '__GB__', memoryInGb), '__PRICE_VCPU_SECOND__', pricePerVcpuSecond), '__PRICE_GB_SECOND__', pricePerGbSecond)
// The Container Apps job's executions, from the platform's system log. The
// environment's appLogsConfiguration destination is 'log-analytics'
// (containerapps/job.bicep), which writes the legacy custom table
// ContainerAppSystemLogs_CL: the columns of the resource-specific
// ContainerAppSystemLogs (Azure Monitor Logs reference, "ContainerAppSystemLogs":
// JobName, Reason, Log, ReplicaName, Type, ...) with a type suffix, _s for
// strings (JobName_s, Reason_s, Log_s). The execution's name is ExecutionName_s
// there (not in the resource-specific reference; read with column_ifexists so
// a missing column leaves it empty instead of failing the query). Reason_s
// carries the Kubernetes job controller's reasons: Completed for an execution
// that exited 0, BackoffLimitExceeded for one that exited non-zero
// (replicaRetryLimit 0), DeadlineExceeded when replicaTimeout stopped it.
var executionsQuery = '''
ContainerAppSystemLogs_CL
| where JobName_s == "__JOB_NAME__"
| extend execution = tostring(column_ifexists("ExecutionName_s", ""))
| where isnotempty(execution)
| summarize started = min(TimeGenerated), last_event = max(TimeGenerated),
            outcome = take_anyif(Reason_s, Reason_s in ("Completed", "BackoffLimitExceeded", "DeadlineExceeded")),
            detail = take_anyif(Log_s, Reason_s in ("BackoffLimitExceeded", "DeadlineExceeded"))
    by execution
| extend outcome = iff(isempty(outcome), "running (or no end event yet)", outcome)
| order by started desc
| take 200
'''
var executionsQueryForJob = replace(executionsQuery, '__JOB_NAME__', jobName)
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
  items: concat([
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
      name: 'cost'
      content: union(kqlItem, {
        title: 'Estimated compute cost per day (task seconds × ${vcpuCores} vCPU / ${memoryInGb} GB at list price; start-up not included)'
        query: '${linesQuery}${costQueryPriced}'
        visualization: 'barchart'
      })
    }
    {
      type: 3
      name: 'queue-depth'
      content: union(kqlItem, {
        title: 'Queue depth: task queues and webhook outboxes; on ACI the backlog report (depth at least, oldest message age)'
        query: '${linesQuery}${depthQuery}'
        visualization: 'timechart'
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
  ], empty(jobName) ? [] : [
    {
      type: 3
      name: 'job-executions'
      content: union(kqlItem, {
        title: 'Job executions (${jobName}): start, last event, outcome'
        query: executionsQueryForJob
        visualization: 'table'
      })
    }
  ])
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
